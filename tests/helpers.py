"""Shared by the test modules: `invoke` (the CLI in-process), tiny presets small enough for 2 CPU cores, and data
made in code (a tiny VAE, latent shards)."""

from diffit_cli.config import load_preset


def invoke(*args, env=None):
    """Run `diffit ARGS...` in this process and return click's `Result` (`exit_code`, `output`, `exception`).

    Arguments may be paths or numbers (each is passed as `str(arg)`); `env` sets environment variables for the
    call only. A fresh app per call, so no state leaks from one invocation to the next."""
    from typer.testing import CliRunner

    from diffit_cli.app import build_app

    return CliRunner().invoke(build_app(), [str(a) for a in args], env=env)


def set_flags(overrides):
    """`--set KEY=VALUE` pairs for the command line, one per preset override."""
    return [flag for override in overrides for flag in ("--set", override)]


TINY_UNET = [
    "model.img_resolution=16",
    "data.resolution=16",
    "model.channels=[16, 16]",
    "model.blocks=[1, 1]",
    "model.window_size=[4, 4]",
    "model.head_dim=8",
    "model.time_dim=32",
    "model.mlp_ratio=2.0",
    "train.batch=8",
    "train.total_kimg=0.032",
    "train.report_kimg=0.008",
    "train.snapshot_kimg=0.016",
    "train.lr_rampup_kimg=0",
    "train.mixed_precision=fp32",
    "data.num_workers=0",
    "sample.steps=4",
    "sample.batch=8",
    "model.num_classes=0",
    "data.use_labels=false",
]

TINY_VIT = [
    "model.input_size=8",
    "data.resolution=64",
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.num_classes=4",
    "train.batch=8",
    "train.total_kimg=0.016",
    "train.report_kimg=0.008",
    "train.snapshot_kimg=0.008",
    "train.mixed_precision=fp32",
    "data.num_workers=0",
    "sample.steps=4",
    "sample.sampler=ddpm",
    "sample.batch=4",
    "sample.guidance.scale=2.0",
]


def weights_state(preset, net):
    """A training state holding `net` as both the trained and the EMA weights, at step 0, with its preset: what
    `save_checkpoint` writes, for tests that need a checkpoint without training."""
    from diffit_cli.config import dump_preset

    return {
        "model": net.state_dict(),
        "ema": net.state_dict(),
        "optimizer": {},
        "nimg": 0,
        "step": 0,
        "skipped": 0,
        "preset": dump_preset(preset),
    }


def save_self_describing_safetensors(path, net, preset):
    """A `.safetensors` file carrying its preset in the metadata, a form `read_snapshot` accepts."""
    from safetensors.torch import save_file

    from diffit_cli.config import dump_preset

    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"preset": dump_preset(preset)})
    return path


def tiny_unet(*extra: str):
    return load_preset("demo", TINY_UNET + list(extra))


def tiny_vit(*extra: str):
    return load_preset("imagenet256", TINY_VIT + list(extra))


def save_tiny_vae(root):
    """A random AutoencoderKL with sd-vae-ft-ema's 4-block layout at tiny widths, saved as a folder and a file."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from diffit_cli.codecs import vae_config

    cfg = vae_config()
    cfg["block_out_channels"] = [32, 32, 64, 64]  # same 4-block layout, tiny widths (groups of 32)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(cfg).eval()
    vae.save_pretrained(root / "folder")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, root / "vae.safetensors")
    return root


def fake_latent_shards(root, n=16, size=8, classes=4):
    """Latent shards in the encode-latents format with random stats (no VAE needed)."""
    import torch

    from diffit_cli.data import read_manifest, shard_name, write_manifest, write_shard

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    write_shard(
        root / shard_name(0),
        torch.randn(n, 2, 4, size, size, generator=g),
        torch.rand(n, 2, 4, size, size, generator=g) * 0.1,
        torch.arange(n) % classes,
    )
    write_manifest(
        root,
        {
            "format": "diffit-latents",
            "version": 1,
            "complete": True,
            "resolution": size * 8,
            "latent_channels": 4,
            "latent_size": size,
            "scaling_factor": 0.18215,
            "count": n,
            "num_classes": classes,
            "class_names": [f"c{i}" for i in range(classes)],
            "dtype": "fp32",
            "shard_size": n,
            "shards": [{"file": shard_name(0), "count": n}],
            "vae": "test",
            "mirror": True,
        },
    )
    read_manifest(root)
    return root


def final_checkpoint(run_dir):
    """The run's latest checkpoint, loaded."""
    from diffit_cli.checkpoint import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))


def assert_same_state(a, b, exact=True):
    """Two checkpoints hold the same weights, EMA (and post-hoc EMA profiles) and step (and, when `exact`, bit-equal
    weights and Adam moments)."""
    import torch

    weights = [(key, a[key], b[key]) for key in ("model", "ema")]
    assert a.keys() == b.keys()
    weights += [(f"posthoc_ema {s}", a["posthoc_ema"][s], b["posthoc_ema"][s]) for s in a.get("posthoc_ema", {})]
    for key, wa, wb in weights:
        for k in wa:
            if exact:
                assert torch.equal(wa[k], wb[k]), f"{key}.{k}"
            else:
                torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=f"{key}.{k}")
    if exact:
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        for i in sa:
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sa[i][k], sb[i][k]), f"optimizer {i}.{k}"
    assert (a["nimg"], a["step"]) == (b["nimg"], b["step"])


def read_pngs(out, seeds):
    """The PNGs `diffit sample` wrote to the folder `out` for `seeds`, stacked (N, H, W, C)."""
    import numpy as np
    from PIL import Image

    from diffit_cli.sampling.sinks import png_path

    return np.stack([np.asarray(Image.open(png_path(out, s))) for s in seeds])


def folder_bytes(folder):
    """{file name: bytes} of every file in `folder`: two runs wrote the same files when these are equal."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def encode_cli(images, out, vae, *extra):
    """`diffit encode-latents` at 32² with the tiny test settings (2 images a batch, 4 a shard, on the CPU)."""
    return invoke(
        "encode-latents",
        images,
        out,
        "--resolution",
        32,
        "--vae",
        vae,
        "--batch",
        2,
        "--shard-size",
        4,
        "--workers",
        0,
        "--device",
        "cpu",
        *extra,
    )


def perturbed_net(preset):
    """The preset's network with every weight nudged by seeded noise, the zero-initialised head included, so that
    its outputs (and sampled images) depend on the weights."""
    import torch

    from diffit_cli.build import build_network

    torch.manual_seed(0)
    net = build_network(preset.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net
