"""Models, audio frontend, sampler, avatar preparation and the streaming Session API."""
