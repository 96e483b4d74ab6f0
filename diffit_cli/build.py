"""The one place that turns a preset into a network, a diffusion object and an optimizer
(docs/architecture.md, 'Pipeline').

Each builder receives only its own preset section, so the schema and the constructors stay in step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffit_cli.config import DDPMConfig, EDMConfig, EDMVEConfig, EDMVPConfig, ModelConfig, TrainConfig
from diffit_cli.core.attention import set_attention_kernel
from diffit_cli.core.baselines import EncoderDecoder
from diffit_cli.core.ddpm import GaussianDiffusion
from diffit_cli.core.ddpmpp import DDPMpp
from diffit_cli.core.edm import EDM
from diffit_cli.core.precond import VEPrecond, VPPrecond
from diffit_cli.core.unet import ImageDiffiT
from diffit_cli.core.vit import LatentDiffiT


def build_network(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """Network from `preset.model` (ImageDiffiT for `unet`, LatentDiffiT for `vit`, ablation baselines otherwise)."""
    kwargs = cfg.model_dump(exclude={"kind", "attention_kernel"})
    if cfg.kind == "unet":
        net = ImageDiffiT(**kwargs)
    elif cfg.kind == "vit":
        net = LatentDiffiT(**kwargs)
    elif cfg.kind == "encdec":  # Table 4 baselines
        net = EncoderDecoder(**kwargs)
    elif cfg.kind == "ddpmpp":  # Table 5 baseline
        net = DDPMpp(**kwargs)
    else:
        raise TypeError(f"unknown model kind {cfg.kind!r}")
    set_attention_kernel(net, getattr(cfg, "attention_kernel", "sdpa"))
    return net if device is None else net.to(device)


def build_diffusion(cfg: EDMConfig | DDPMConfig, model: ModelConfig):
    """Diffusion object from `preset.diffusion`; the DDPM variance type follows the network's `learn_sigma`."""
    if isinstance(cfg, EDMConfig):
        return EDM(**cfg.model_dump(exclude={"kind"}))
    if isinstance(cfg, (EDMVPConfig, EDMVEConfig)):  # Table 5: EDM's VP / VE preconditioning
        return (VPPrecond if isinstance(cfg, EDMVPConfig) else VEPrecond)(**cfg.model_dump(exclude={"kind"}))
    learn_sigma = getattr(model, "learn_sigma", False)
    return GaussianDiffusion(num_timesteps=cfg.num_timesteps, schedule=cfg.schedule, learn_sigma=learn_sigma)


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (EDM, image space) or AdamW (DiT/ADM, latent space) from `preset.train`, with torch's fused kernel where
    it has one for the parameters' device (CUDA, CPU): one launch for all parameters, and a step it skips on a
    device-side `found_inf` flag without a host sync (`training.recipe.step_unless`)."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = list(params)
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    try:
        return cls(params, fused=True, **kwargs)
    except RuntimeError:  # a device without the fused kernel
        return cls(params, **kwargs)


def want_compile(setting: bool | str, device: torch.device | str) -> bool:
    """`train.compile` / `sample --compile`: "auto" compiles on CUDA only (inductor on a CPU costs minutes of
    compile time for little gain); true or false force it."""
    return torch.device(device).type == "cuda" if setting == "auto" else bool(setting)


def compile_blocks(net: torch.nn.Module, note: Callable[[str], None] | None = None, **options) -> int:
    """Regional compilation: `torch.compile` each of the network's `checkpointable_blocks()` (the repeated block)
    in place, so identical blocks share one compiled graph (compile time of one block, not of the whole network),
    activation checkpointing (applied before) stays inside the region, DDP sees an ordinary module and the
    state-dict keys do not change. If compiling fails, every block runs eagerly from then on and `note` gets one
    line naming the error. `options` go to torch.compile (e.g. backend, mode). Returns the number of blocks.

    Static shapes by default (`dynamic=False`): the U-Net's blocks of one class run at several resolutions, and
    dynamo's automatic dynamic shapes then made inductor fail on the `demo` network ("cannot determine truth value
    of Relational: 1 < s53", seen on CPU); with static shapes each resolution gets its own graph.

    Every block of a class runs one code object, and dynamo keeps one graph per (shape, grad mode) of every network
    compiled in the process in that object's cache, which stops at `recompile_limit` (8): past it the blocks ran
    eagerly without a word (seen with several U-Nets compiled in one process, as `ablate` trains them). So each
    call makes room for this network's blocks."""
    failed: list[str] = []
    options = {"dynamic": False, **options}
    blocks = net.checkpointable_blocks()
    room = 4 * len(blocks)  # at most one shape per block, in training and in sampling (no grad), at two batch sizes
    torch._dynamo.config.recompile_limit += room
    torch._dynamo.config.accumulated_recompile_limit += room

    def regional(block: torch.nn.Module):
        compiled, eager = torch.compile(block._call_impl, **options), block._call_impl

        def call(*args, **kwargs):
            if not failed:
                try:
                    return compiled(*args, **kwargs)
                except Exception as e:  # a compiler that cannot run here: eager (a real error re-raises below)
                    out = eager(*args, **kwargs)
                    failed.append(_first_cause(e))
                    if note is not None:
                        note(f"torch.compile failed ({failed[0]}); running the network eagerly")
                    return out
            return eager(*args, **kwargs)

        return call

    for block in blocks:
        block._compiled_call_impl = regional(block)  # what nn.Module.__call__ runs (as Module.compile() sets it)
    return len(blocks)


def _first_cause(e: BaseException) -> str:
    """The innermost cause of a (compiler) error as one short line."""
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:  # dynamo wraps the backend's
        e = inner
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def count_parameters(net: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters of a built network."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def count_config_parameters(cfg: ModelConfig) -> int:
    """Parameters of the network a model section (`preset.model`) describes, built on the meta device to count
    them (no memory, instant even for XL/2)."""
    with torch.device("meta"):
        return count_parameters(build_network(cfg))
