"""The toy bed's geometry is a parameter: a bed being tried is trained, saved and loaded as built."""

from __future__ import annotations


def test_a_bed_built_with_another_geometry_records_it_and_loads_as_built(tmp_path):
    """``pretrain(geometry=...)`` (``--geometry``) trains that geometry from scratch; the weights carry it, so
    `load_toy_model` (and a fine-tune started from them) rebuild the same model."""
    from astrolabe_rl.toy import pretrain
    from astrolabe_rl.toy.model import load_toy_model, toy_config

    geometry = {"patch_size": [1, 1, 1], "dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1}
    out = tmp_path / "bed.safetensors"
    record = pretrain.pretrain(1, 1, 1e-3, 1, 0.01, 0.9, 0, 0.25, out, geometry=geometry, mean_target=False)
    assert tuple(record["model"]["patch_size"]) == (1, 1, 1) and record["model"]["dim"] == 32
    config = toy_config(out)
    assert (config.patch_size, config.dim, config.num_layers) == ((1, 1, 1), 32, 1)
    model = load_toy_model(out)
    assert model.config == config and model.patch_embedding.weight.shape[-2:] == (1, 1)
    tuned = pretrain.pretrain(1, 1, 1e-3, 1, 0.01, 0.9, 1, 0.25, tmp_path / "tuned.safetensors", init=out,
                              mean_target=False)
    assert tuned["model"] == record["model"]
