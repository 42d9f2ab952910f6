"""Vision transformer forecaster on latitude-longitude patches (Stormer / Pangu / Swin style).

Conventions
-----------
* Fields are ``(batch, channels, latitude, longitude)``; latitude is the first spatial axis and
  is **not** periodic. Longitude, the second, wraps around on a global grid
  (``periodic_longitude=True``) and does not on a regional one (``periodic_longitude=False``):
  there the east edge never influences the west edge, nor the west the east.
* Tokens are kept as a patch grid ``(batch, lat_patches, lon_patches, embed_dim)`` between blocks.
* Latitude is zero padded (symmetrically, at both poles) to a multiple of ``patch_size``;
  longitude is padded at its east end, circularly on a global grid (the first columns are
  appended) and with zeros on a regional one, and both paddings are cropped from the output.
* Position information is a learned embedding per latitude patch row only: nothing depends on
  absolute longitude, so on a global grid the model is equivariant to rolling the input along
  longitude by a multiple of ``patch_size`` (global attention) or ``patch_size * window``
  (windowed attention), provided ``n_longitude`` is a multiple of ``patch_size`` (and the number
  of longitude patches a multiple of ``window``); otherwise the padding breaks the symmetry but
  the model still works.
* Windowed attention partitions the patch grid into ``window x window`` windows. Latitude never
  wraps: shifted windows pad latitude by ``window // 2`` rows of masked tokens at the top, so no
  window spans a pole. On a global grid the windows lie on a cylinder (shifted windows roll
  longitude with :func:`torch.roll`); on a regional grid longitude is treated like latitude
  (``window // 2`` masked columns at the west, no roll), which partitions the tokens exactly as
  Swin's masked cyclic shift does, so no window holds tokens of both the east and west edges.
  Padded tokens are never attended to. Global attention (``window = 0``) lets every token see
  every other, on any grid.
* Lead time conditions every block through adaptive layer norm (adaLN, as DiT / Stormer). The
  gates are initialised small but non-zero so that every parameter gets a gradient at step one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from weathermodel.models.config import TransformerConfig

#: standard deviation of the initial adaLN modulation weights (small, non-zero gates).
ADALN_INIT_STD = 1e-3


def lead_time_features(lead_time_hours: torch.Tensor, dim: int,
                       max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of the lead time (as DiT timestep features).

    Parameters
    ----------
    lead_time_hours : ``(batch,)`` lead times in hours.
    dim : number of features (even).
    max_period : longest period, in hours, of the sinusoids.

    Returns
    -------
    ``(batch, dim)`` tensor ``[cos(t * f_i), sin(t * f_i)]`` with frequencies ``f_i`` spaced
    geometrically from 1 to ``1 / max_period`` per hour.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=lead_time_hours.dtype, device=lead_time_hours.device)
    frequencies = torch.exp(-math.log(max_period) * exponent / half)
    angles = lead_time_hours[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class LeadTimeEmbedding(nn.Module):
    """Lead time (hours) -> conditioning vector ``(batch, embed_dim)`` via sinusoids and an MLP.

    Parameters
    ----------
    embed_dim : width of the conditioning vector.
    frequency_dim : number of sinusoidal features.
    """

    def __init__(self, embed_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, embed_dim), nn.SiLU(),
                                 nn.Linear(embed_dim, embed_dim))

    def forward(self, lead_time_hours: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        # Sinusoids are computed in at least float32 even if the weights are in lower precision.
        hours = lead_time_hours.to(torch.promote_types(weight.dtype, torch.float32))
        features = lead_time_features(hours, self.frequency_dim)
        return self.mlp(features.to(weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``.

    ``x`` is ``(batch, ..., dim)``; ``shift`` and ``scale`` are ``(batch, dim)`` and are
    broadcast over the middle (token) axes.
    """
    extra = (1,) * (x.dim() - 2)
    shift = shift.reshape(shift.shape[0], *extra, shift.shape[-1])
    scale = scale.reshape(scale.shape[0], *extra, scale.shape[-1])
    return x * (1 + scale) + shift


class PatchEmbedding(nn.Module):
    """Pad the field and embed non-overlapping ``patch x patch`` patches.

    Latitude is zero padded symmetrically (``pad_top`` rows at the first, ``pad_bottom`` at the
    last latitude) and longitude at its end (``pad_east`` columns) to multiples of
    ``patch_size``: circularly (the first columns) on a global grid, with zeros on a regional one.

    Parameters
    ----------
    in_channels, embed_dim, patch_size : convolution sizes (kernel = stride = ``patch_size``).
    n_latitude, n_longitude : grid size of the input.
    periodic_longitude : whether longitude wraps around (global grid).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, n_latitude: int,
                 n_longitude: int, periodic_longitude: bool = True) -> None:
        super().__init__()
        self.periodic_longitude = periodic_longitude
        pad_lat = (-n_latitude) % patch_size
        self.pad_top = pad_lat // 2
        self.pad_bottom = pad_lat - self.pad_top
        self.pad_east = (-n_longitude) % patch_size
        self.n_lat_patches = (n_latitude + pad_lat) // patch_size
        self.n_lon_patches = (n_longitude + self.pad_east) // patch_size
        self.projection = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, in_channels, n_lat, n_lon)`` -> ``(batch, lat_patches, lon_patches, dim)``."""
        if self.pad_east and self.periodic_longitude:
            n_lon = x.shape[-1]
            columns = torch.arange(n_lon + self.pad_east, device=x.device) % n_lon
            x = x[..., columns]  # circular padding: the first columns appended at the end
        elif self.pad_east:
            x = F.pad(x, (0, self.pad_east))  # regional: zeros, the west edge stays out
        if self.pad_top or self.pad_bottom:
            x = F.pad(x, (0, 0, self.pad_top, self.pad_bottom))
        return rearrange(self.projection(x), "b d h w -> b h w d")


class Mlp(nn.Module):
    """Two-layer feed-forward network with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all patches of the grid.

    Parameters
    ----------
    dim : token width.
    num_heads : attention heads (``dim`` must be a multiple).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, lat_patches, lon_patches, dim)`` -> same shape."""
        _, n_lat, n_lon, _ = x.shape
        q, k, v = rearrange(self.qkv(x), "b h w (three n e) -> three b n (h w) e",
                            three=3, n=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b n (h w) e -> b h w (n e)", h=n_lat, w=n_lon)
        return self.proj(out)


class RelativePositionBias(nn.Module):
    """Learned bias per head and relative offset inside a ``window x window`` window (Swin).

    Returns a ``(num_heads, window**2, window**2)`` additive attention bias; it depends only on
    the offset between query and key, so it keeps longitude equivariance.
    """

    def __init__(self, window: int, num_heads: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)  # (2, window**2)
        relative = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, L, L)
        index = relative[0] * (2 * window - 1) + relative[1]
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        return rearrange(self.table[self.index], "q k n -> n q k")


class WindowAttention(nn.Module):
    """Multi-head self-attention within ``window x window`` windows of patches.

    With ``shift``, windows move by ``window // 2`` patches in both directions. Latitude is
    padded by ``window // 2`` rows of masked tokens at the top so that no window crosses a pole.
    Longitude is rolled on a global grid (windows wrap around); on a regional grid it is padded
    like latitude, by ``window // 2`` masked columns at the west, so that no window joins the
    east and west edges. The grid is then padded with masked tokens at the bottom (latitude)
    and east (longitude) to a multiple of ``window``.

    Parameters
    ----------
    dim : token width.
    num_heads : attention heads.
    window : window edge in patches.
    shift : whether this block uses shifted windows.
    periodic_longitude : whether longitude wraps around (global grid).
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: bool,
                 periodic_longitude: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.shift = window // 2 if shift else 0
        self.periodic_longitude = periodic_longitude
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias = RelativePositionBias(window, num_heads)
        self._padding_masks: dict[tuple, torch.Tensor] = {}

    @property
    def _pad_west(self) -> int:
        """Masked columns before the first longitude (regional grids' shifted windows)."""
        return 0 if self.periodic_longitude else self.shift

    def _pad_and_roll(self, x: torch.Tensor, n_lat: int, n_lon: int) -> torch.Tensor:
        """Pad a ``(..., n_lat, n_lon, dim)`` grid to whole windows; roll a global longitude."""
        pad_top, pad_west = self.shift, self._pad_west
        pad_bottom = (-(n_lat + pad_top)) % self.window
        pad_east = (-(n_lon + pad_west)) % self.window
        x = F.pad(x, (0, 0, pad_west, pad_east, pad_top, pad_bottom))
        if self.shift and self.periodic_longitude:
            x = torch.roll(x, -self.shift, dims=-2)
        return x

    def _padding_mask(self, n_lat: int, n_lon: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
        """Additive mask ``(windows, 1, 1, L)``: 0 for real keys, ``-inf`` for padded ones.

        It depends only on the grid's shape, so it is built once per shape, dtype and device
        and cached (not saved: a plain attribute, rebuilt on demand).
        """
        key = (n_lat, n_lon, dtype, device)
        cached = self._padding_masks.get(key)
        if cached is None:
            valid = torch.ones(n_lat, n_lon, 1, dtype=torch.bool, device=device)
            valid = self._pad_and_roll(valid, n_lat, n_lon)
            valid = rearrange(valid, "(nh p) (nw q) 1 -> (nh nw) 1 1 (p q)",
                              p=self.window, q=self.window)
            cached = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill(
                ~valid, float("-inf"))
            self._padding_masks[key] = cached
        return cached

    def _attention_mask(self, n_lat: int, n_lon: int, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
        """Additive mask ``(windows, heads, L, L)``: relative bias, ``-inf`` for padded keys.

        The bias is a parameter, so it is added to the cached padding mask at every call.
        """
        bias = self.relative_position_bias().to(dtype)  # (heads, L, L)
        return bias[None] + self._padding_mask(n_lat, n_lon, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, lat_patches, lon_patches, dim)`` -> same shape.

        Windows and heads share one axis, ``(batch, windows * heads, L, head_dim)``, so that the
        ``(1, windows * heads, L, L)`` mask broadcasts over the batch (never repeated per
        sample) and ``scaled_dot_product_attention`` gets the 4-D inputs its fused kernels take.
        """
        batch, n_lat, n_lon, _ = x.shape
        qkv = self._pad_and_roll(self.qkv(x), n_lat, n_lon)
        padded_lat = qkv.shape[1]
        q, k, v = rearrange(qkv, "b (nh p) (nw q) (three n e) -> three b (nh nw n) (p q) e",
                            p=self.window, q=self.window, three=3, n=self.num_heads)
        mask = self._attention_mask(n_lat, n_lon, q.dtype, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.flatten(0, 1)[None])
        out = rearrange(out, "b (nh nw n) (p q) e -> b (nh p) (nw q) (n e)",
                        nh=padded_lat // self.window, n=self.num_heads, p=self.window,
                        q=self.window)
        if self.shift and self.periodic_longitude:
            out = torch.roll(out, self.shift, dims=2)
        west = self._pad_west
        out = out[:, self.shift:self.shift + n_lat, west:west + n_lon]
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with adaLN modulation of both sublayers (DiT / Stormer).

    ``x <- x + gate_a * attn(modulate(norm(x), shift_a, scale_a))`` then the same for the MLP,
    where the six modulation vectors come from the conditioning vector ``c``.

    Parameters
    ----------
    dim, num_heads, mlp_ratio : sizes.
    window : attention window in patches; 0 for global attention.
    shift : shifted windows (ignored for global attention).
    periodic_longitude : whether windows wrap around in longitude (global grid).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: int,
                 shift: bool, periodic_longitude: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attention: nn.Module = (
            WindowAttention(dim, num_heads, window, shift, periodic_longitude) if window
            else GlobalAttention(dim, num_heads))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x``: ``(batch, lat_patches, lon_patches, dim)``; ``c``: ``(batch, dim)``."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=-1)
        x = x + gate_a[:, None, None] * self.attention(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m[:, None, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and linear map of each token to its ``patch x patch x out`` values."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class WeatherTransformer(nn.Module):
    """Lead-time conditioned vision transformer on a latitude-longitude grid.

    Parameters
    ----------
    config : transformer sizes (``window = 0`` means global attention).
    in_channels, out_channels : channels of input and output fields.
    n_latitude, n_longitude : grid size (any; padded internally and cropped back).
    activation_checkpointing : recompute each block's activations in the backward pass
        (only while training).
    periodic_longitude : True for a grid that goes all the way round in longitude (windows and
        patch padding wrap, east edge next to west edge); False for a regional grid, whose
        east and west edges then never influence each other through windowed attention or
        padding. Take it from the grid (``weathermodel.data.grid.describe_grid(...).is_global``).

    Notes
    -----
    ``forward(x, lead_time_hours)`` maps ``x`` of shape ``(batch, in_channels, n_latitude,
    n_longitude)`` and ``lead_time_hours`` of shape ``(batch,)`` to ``(batch, out_channels,
    n_latitude, n_longitude)``. Blocks alternate unshifted / shifted windows. The same code runs
    on CPU and CUDA, in float32/float64 or under bfloat16 autocast.
    """

    def __init__(self, config: TransformerConfig, in_channels: int, out_channels: int,
                 n_latitude: int, n_longitude: int,
                 activation_checkpointing: bool = False, *,
                 periodic_longitude: bool = True) -> None:
        super().__init__()
        config.validate()
        if config.window < 0 or config.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1 and window >= 0, got "
                             f"{config.patch_size} and {config.window}")
        self.config = config
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_latitude = n_latitude
        self.n_longitude = n_longitude
        self.activation_checkpointing = activation_checkpointing
        self.periodic_longitude = bool(periodic_longitude)
        dim = config.embed_dim
        self.patch_embedding = PatchEmbedding(in_channels, dim, config.patch_size, n_latitude,
                                              n_longitude, self.periodic_longitude)
        n_lat_patches = self.patch_embedding.n_lat_patches
        self.latitude_embedding = nn.Parameter(torch.zeros(n_lat_patches, 1, dim))
        self.lead_time_embedding = LeadTimeEmbedding(dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, config.num_heads, config.mlp_ratio, config.window,
                             shift=bool(config.window) and i % 2 == 1,
                             periodic_longitude=self.periodic_longitude)
            for i in range(config.depth))
        self.final_layer = FinalLayer(dim, config.patch_size, out_channels)
        self._initialise()

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.patch_embedding.projection.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embedding.projection.bias)
        nn.init.trunc_normal_(self.latitude_embedding, std=0.02)
        for linear in self.lead_time_embedding.mlp[::2]:
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            if isinstance(block.attention, WindowAttention):
                nn.init.trunc_normal_(block.attention.relative_position_bias.table, std=0.02)
        for module in [*(b.modulation for b in self.blocks), self.final_layer.modulation]:
            # adaLN "almost zero": gates start small but non-zero so no gradient vanishes.
            nn.init.normal_(module[-1].weight, std=ADALN_INIT_STD)
            nn.init.zeros_(module[-1].bias)
        nn.init.trunc_normal_(self.final_layer.linear.weight, std=0.02)

    def largest_activation(self) -> int:
        """Elements of the largest tensor of one sample's forward pass: the MLP hidden layer
        over every token (patches, ``embed_dim * mlp_ratio``)."""
        tokens = self.patch_embedding.n_lat_patches * self.patch_embedding.n_lon_patches
        return tokens * int(self.config.embed_dim * self.config.mlp_ratio)

    def _check_inputs(self, x: torch.Tensor, lead_time_hours: torch.Tensor) -> None:
        expected = (self.in_channels, self.n_latitude, self.n_longitude)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input of shape (batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got {tuple(x.shape)}: build the model for this "
                             "grid and channel count")
        if lead_time_hours.shape != (x.shape[0],):
            raise ValueError(f"lead_time_hours must have shape ({x.shape[0]},), got "
                             f"{tuple(lead_time_hours.shape)}: give one lead time per sample")

    def forward(self, x: torch.Tensor, lead_time_hours: torch.Tensor) -> torch.Tensor:
        """Predict ``(batch, out_channels, n_latitude, n_longitude)`` from ``x`` and lead time."""
        self._check_inputs(x, lead_time_hours)
        c = self.lead_time_embedding(lead_time_hours)
        tokens = self.patch_embedding(x) + self.latitude_embedding
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        out = self.final_layer(tokens, c)
        p = self.config.patch_size
        out = rearrange(out, "b h w (p q c) -> b c (h p) (w q)", p=p, q=p)
        top = self.patch_embedding.pad_top
        return out[:, :, top:top + self.n_latitude, :self.n_longitude]
