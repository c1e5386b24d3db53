"""The toy world: synthetic videos and prompts, an exact toy VAE and text encoder, toy rewards, the shipped model.

Modules (import them directly; this package imports nothing heavy):

* `world`: the grammar, train / held-out splits and the deterministic renderer;
* `vae`, `text`: the fixed latent map and embedding table (nothing but the DiT is learned);
* `rewards`: visual quality (honest, and a hackable proxy), motion quality, text alignment, and the noise monitor;
* `oracle`: fits videos to the world's parameters, the never-optimised headline of every demo and benchmark;
* `model`: the shipped weights (``toy``: the distilled student; ``toy_fm``: the flow-matching base);
  `pretrain`: how the base was made; `distill`: how the student was made from it; `demo`: ``astrolabe demo``.
"""
