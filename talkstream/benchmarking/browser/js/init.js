// Before the page's scripts: keep every RTCPeerConnection, to read its getStats() later.
(() => {
  const Orig = window.RTCPeerConnection;
  if (!Orig || window.__tsbench) return;
  const pcs = [];
  window.__tsbench = { pcs };
  const Wrapped = function (...args) {
    const pc = new Orig(...args);
    pcs.push(pc);
    return pc;
  };
  Wrapped.prototype = Orig.prototype;
  Object.setPrototypeOf(Wrapped, Orig);
  window.RTCPeerConnection = Wrapped;
})();
