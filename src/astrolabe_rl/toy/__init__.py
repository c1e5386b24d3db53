"""The toy world: synthetic videos and prompts, an exact toy VAE and text encoder, toy rewards, the shipped model.

Modules (import them directly; this package imports nothing heavy):

* `world`: the grammar, train / held-out splits and the deterministic renderer;
* `vae`, `text`: the fixed latent map and embedding table (nothing but the DiT is learned);
* `rewards`: visual quality (hackable), motion quality, text alignment, and the noise monitor that shows the hack;
* `model`: the shipped weights; `pretrain`: how they were made; `demo`: ``astrolabe demo``.
"""
