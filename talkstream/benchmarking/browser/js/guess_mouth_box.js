// An older server sends no mouth_box: time the lower middle of the video instead.
(() => {
  const v = document.getElementById("video");
  const w = v.videoWidth || 512, h = v.videoHeight || 512;
  talkstream.mouthBox = [
    Math.round(0.3 * w), Math.round(0.55 * h), Math.round(0.7 * w), Math.round(0.85 * h),
  ];
})()
