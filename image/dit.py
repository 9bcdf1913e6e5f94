"""DiT: the image diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers", Fig. 3) = patchify + fixed 2-D sin-cos positions + the generic
``TokenTransformer`` + adaLN final layer + unpatchify.

It reproduces facebookresearch/DiT ``models.py`` exactly (see ``image/convert.py`` for
official checkpoints and ``tests/test_dit_reference.py``). SiT (Ma et al. 2024) uses the
same network: its velocity output is ``DiT(...)(x, t, y)[:, :in_channels]``.

Time convention: ``t`` goes straight into the sinusoidal embedder, as in the official
models: DiT takes integer steps 0..999 (float steps work too), SiT a float in [0, 1] with
data at 1. polydiff's continuous ``t in [0, 1]`` (data at 0) must be mapped by the caller,
e.g. ``t_dit = t * 999`` for a 1000-step DiT schedule or ``t_sit = 1 - t`` for SiT.
"""

from __future__ import annotations

import torch
from torch import nn

from core.nn.embeddings import sincos_pos_embed_2d
from core.nn.transformer import DiTBlock, FinalLayer, TokenTransformer, TransformerConfig

# Table 1 of the DiT paper: (depth, hidden size, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


class DiT(nn.Module):
    """Class-conditional latent DiT. Arguments use the official names.

    input_size: latent side (or (H, W)); patch_size: p; in_channels: C;
    learn_sigma: output 2C channels (eps, then variance interpolation values) instead of C;
    class_dropout_prob: label dropout in training (row ``num_classes`` is the null class);
    side_interpolator_depth: with MDT masking (``mask_ratio > 0``), the number of extra DiT blocks
    of MDT's side-interpolator (Gao et al. 2023, Fig. 3), used only in masked training forwards.
    Extra keyword arguments go to ``TransformerConfig`` (e.g. qk_norm, rope_axes, long_skip,
    mask_ratio, mask_decoder_depth, route_ratio, route_start, route_end, grad_checkpointing).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        side_interpolator_depth: int = 0,
        **transformer_options,
    ):
        super().__init__()
        H, W = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if H % patch_size or W % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        self.input_size, self.patch_size, self.in_channels = (H, W), patch_size, in_channels
        self.grid = (H // patch_size, W // patch_size)
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.config = TransformerConfig(
            dim=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
            **transformer_options,
        )

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        pos = sincos_pos_embed_2d(hidden_size, *self.grid)[None]
        self.register_buffer("pos_embed", pos, persistent=False)  # fixed: rebuilt, not stored
        self.transformer = TokenTransformer(self.config)
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        if side_interpolator_depth < 0:
            raise ValueError(f"side_interpolator_depth must be >= 0, got {side_interpolator_depth}")
        self.side_interpolator = None
        self._keep_idx = None  # set only during a masked forward
        if self.config.mask_ratio > 0 and side_interpolator_depth > 0:
            self.side_interpolator = nn.ModuleList(DiTBlock(self.config) for _ in range(side_interpolator_depth))
            # adaLN-Zero like the trunk: each side block starts as the identity
            for block in self.side_interpolator:
                nn.init.zeros_(block.modulation.weight)
                nn.init.zeros_(block.modulation.bias)
            first_decoder = self.transformer.blocks[self.config.depth - self.config.mask_decoder_depth]
            first_decoder.register_forward_pre_hook(self._side_interpolate)

        # As DiT: initialise the patch projection like a Linear on the flattened patch.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)

    @classmethod
    def from_name(cls, name: str, **kwargs) -> DiT:
        """``DiT.from_name("DiT-XL/2", input_size=32)``: sizes of the paper's Table 1."""
        try:
            size, patch = name.removeprefix("DiT-").split("/")
            depth, hidden, heads = DIT_SIZES[size]
            patch = int(patch)
        except (KeyError, ValueError):
            raise ValueError(f"unknown DiT config {name!r}; expected DiT-{{S,B,L,XL}}/{{2,4,8}}") from None
        return cls(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads, **kwargs)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, N, D), token index row * W_p + col."""
        if tuple(x.shape[-2:]) != self.input_size or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match in_channels={self.in_channels}, "
                f"input_size={self.input_size}"
            )
        return self.patch_embed(x).flatten(2).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C_out), features ordered (row-in-patch, col-in-patch, channel) -> (B, C_out, H, W)."""
        (h, w), p, c = self.grid, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y=None, *, keep_idx=None, generator=None, return_hidden: int | None = None):
        """x (B, C, H, W), t (B,) as the official model takes it (module docstring), y (B,) int64.

        Returns (B, C_out, H, W). ``keep_idx`` (B, n_keep): MDT token masking (see ``forward_masked``).
        ``generator``: randomness of label dropout and TREAD token routing (training only).
        ``return_hidden=k``: also return the tokens after block ``k`` (1-based), (B, n, D), as REPA
        aligns them (Yu et al. 2024, eq. 8); ``n < N`` when block k sees a subset of the tokens
        (MDT encoder blocks: the kept ones, in ``keep_idx`` order).
        """
        hidden = {}
        handle = None
        if return_hidden is not None:
            if not 1 <= return_hidden <= self.config.depth:
                raise ValueError(f"return_hidden must be in [1, depth={self.config.depth}], got {return_hidden}")
            block = self.transformer.blocks[return_hidden - 1]
            handle = block.register_forward_hook(lambda mod, args, out: hidden.__setitem__("h", out))
        self._keep_idx = keep_idx
        try:
            c = self.transformer.condition(t, y, generator=generator)
            h = self.transformer(self.patchify(x), c, pos_embed=self.pos_embed, keep_idx=keep_idx,
                                 generator=generator)
        finally:
            self._keep_idx = None
            if handle is not None:
                handle.remove()
        out = self.unpatchify(self.final_layer(h, c))
        return (out, hidden["h"]) if return_hidden is not None else out

    def _side_interpolate(self, module, args):
        """MDT side-interpolator (Gao et al. 2023, sec. 3.3): before the first decoder block of a
        masked forward, run the extra blocks over all tokens (masked ones are mask tokens) and keep
        their output only at the masked positions; visible tokens pass unchanged."""
        if self._keep_idx is None:
            return None
        x, c, *rest = args
        z = x
        for block in self.side_interpolator:
            z = block(z, c, *rest)
        visible = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, self._keep_idx, True)
        return (torch.where(visible[..., None], x, z), c, *rest)

    def sample_keep_idx(self, batch: int, generator=None, device=None) -> torch.Tensor:
        """MDT: indices (B, n_keep) of the patches kept in a masked forward."""
        return self.transformer.sample_keep_idx(batch, self.grid[0] * self.grid[1], generator, device)

    def kept_pixels(self, keep_idx: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool, True on pixels of patches in ``keep_idx`` (B, n_keep)."""
        n = self.grid[0] * self.grid[1]
        kept = torch.zeros(keep_idx.shape[0], n, dtype=torch.bool, device=keep_idx.device).scatter_(1, keep_idx, True)
        p = self.patch_size
        return kept.view(-1, 1, *self.grid).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)

    def forward_masked(self, x, t, y=None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """MDT training forward: drop ``mask_ratio`` of the patches at random.

        Returns the output (B, C_out, H, W) and ``kept`` (B, 1, H, W) bool, True on pixels
        of patches the encoder saw, so a loss can weight visible and masked regions.
        """
        keep_idx = self.sample_keep_idx(x.shape[0], generator, x.device)
        return self.forward(x, t, y, keep_idx=keep_idx), self.kept_pixels(keep_idx)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = 3) -> torch.Tensor:
        """Classifier-free guidance in one batch, as official DiT ``forward_with_cfg``.

        x, t, y are (2B, ...): the first half conditional, the second half with ``y =
        num_classes``; only the first half of x is used (duplicated). Guided eps
        ``uncond + cfg_scale * (cond - uncond)`` is written to both halves.
        ``guided_channels=3`` reproduces the official code, which guides only the first 3
        channels "for exact reproducibility" (the 4th latent channel and the variance
        channels pass through unguided). ``guided_channels=None`` guides all eps channels
        (``in_channels``), which is what the CFG formula means.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        g = self.in_channels if guided_channels is None else guided_channels
        eps, rest = out[:, :g], out[:, g:]
        cond_eps, uncond_eps = eps.split(len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
