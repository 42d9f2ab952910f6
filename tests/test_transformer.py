"""Tests of the lead-time conditioned vision transformer (tiny sizes, CPU, a few seconds)."""
from __future__ import annotations

import io

import pytest
import torch

from weathermodel.models.config import TransformerConfig
from weathermodel.models.transformer import WeatherTransformer

IN_CHANNELS = 3
OUT_CHANNELS = 2


def tiny_config(window: int, depth: int = 2, patch_size: int = 2) -> TransformerConfig:
    return TransformerConfig(patch_size=patch_size, embed_dim=16, depth=depth, num_heads=2,
                             mlp_ratio=2.0, window=window)


def make_model(window: int, n_lat: int = 25, n_lon: int = 48, seed: int = 0,
               randomise: bool = False, **kwargs) -> WeatherTransformer:
    """A tiny model; ``randomise`` perturbs every parameter so that blocks matter (O(1) gates)."""
    torch.manual_seed(seed)
    model = WeatherTransformer(tiny_config(window, **kwargs), IN_CHANNELS, OUT_CHANNELS,
                               n_lat, n_lon)
    if randomise:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def inputs(n_lat: int = 25, n_lon: int = 48, batch: int = 2,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, IN_CHANNELS, n_lat, n_lon, generator=generator, dtype=dtype)
    lead = torch.tensor([6.0, 24.0][:batch], dtype=dtype)
    return x, lead


@pytest.mark.parametrize("window", [0, 2, 4])
@pytest.mark.parametrize("grid", [(25, 52), (25, 53), (24, 48), (7, 9)])
def test_output_shape_and_crop(window: int, grid: tuple[int, int]) -> None:
    n_lat, n_lon = grid
    model = make_model(window, n_lat, n_lon).eval()
    x, lead = inputs(n_lat, n_lon)
    with torch.no_grad():
        y = model(x, lead)
    assert y.shape == (2, OUT_CHANNELS, n_lat, n_lon)
    assert torch.isfinite(y).all()
    assert model.patch_embedding.pad_top + model.patch_embedding.pad_bottom == (-n_lat) % 2


def test_wrong_input_shape_is_rejected() -> None:
    model = make_model(0, 25, 48)
    x, lead = inputs(25, 50)
    with pytest.raises(ValueError, match="expected input of shape"):
        model(x, lead)
    x, _ = inputs(25, 48)
    with pytest.raises(ValueError, match="lead_time_hours"):
        model(x, torch.tensor([6.0]))


@pytest.mark.parametrize("window,roll", [(0, 2), (0, 10), (2, 4), (4, 8), (4, -16)])
def test_longitude_roll_equivariance(window: int, roll: int) -> None:
    """Rolling by a multiple of patch_size * window (patch_size if global) rolls the output."""
    model = make_model(window, randomise=True).double().eval()
    x, lead = inputs(dtype=torch.float64)
    with torch.no_grad():
        y = model(x, lead)
        y_rolled = model(torch.roll(x, roll, dims=-1), lead)
    assert torch.allclose(y_rolled, torch.roll(y, roll, dims=-1), atol=1e-10)


@pytest.mark.parametrize("window,roll", [(0, 1), (4, 1), (4, 2), (4, 4)])
def test_other_rolls_are_not_equivariant(window: int, roll: int) -> None:
    """Rolls that do not map patches (or windows) onto patches change the prediction."""
    model = make_model(window, randomise=True).double().eval()
    x, lead = inputs(dtype=torch.float64)
    with torch.no_grad():
        y = model(x, lead)
        y_rolled = model(torch.roll(x, roll, dims=-1), lead)
    assert not torch.allclose(y_rolled, torch.roll(y, roll, dims=-1), atol=1e-4)


def test_windows_do_not_cross_the_poles() -> None:
    """With windows of 4 rows (one unshifted and one shifted block), the first two latitude
    rows depend on rows 0..3 only: a latitude-wrapping shift would reach the last rows."""
    model = make_model(4, 16, 16, randomise=True, patch_size=1).double().eval()
    x, lead = inputs(16, 16, dtype=torch.float64)
    perturbed = x.clone()
    perturbed[:, :, 8:] += torch.randn_like(perturbed[:, :, 8:])
    with torch.no_grad():
        y, y_perturbed = model(x, lead), model(perturbed, lead)
    assert torch.allclose(y[:, :, :2], y_perturbed[:, :, :2], atol=1e-12)
    assert not torch.allclose(y[:, :, 8:], y_perturbed[:, :, 8:], atol=1e-4)
    # ... whereas longitude wraps: the last columns influence the first through shifted windows
    perturbed = x.clone()
    perturbed[..., -2:] += torch.randn_like(perturbed[..., -2:])
    with torch.no_grad():
        y_perturbed = model(perturbed, lead)
    assert not torch.allclose(y[..., :2], y_perturbed[..., :2], atol=1e-4)


@pytest.mark.parametrize("window", [0, 4])
def test_lead_time_changes_the_output(window: int) -> None:
    model = make_model(window).eval()
    x, _ = inputs()
    with torch.no_grad():
        y6 = model(x, torch.tensor([6.0, 6.0]))
        y24 = model(x, torch.tensor([24.0, 24.0]))
    assert (y6 - y24).abs().max() > 1e-6


@pytest.mark.parametrize("window", [0, 4])
def test_gradients_reach_every_parameter(window: int) -> None:
    """At initialisation (no perturbation) gates are small but non-zero: no dead gradient."""
    model = make_model(window, n_lon=52).train()
    x, lead = inputs(n_lon=52)
    model(x, lead).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name


@pytest.mark.parametrize("window", [0, 4])
def test_activation_checkpointing_matches(window: int) -> None:
    x, lead = inputs()
    results = []
    for flag in (False, True):
        model = make_model(window, randomise=True).train()
        model.activation_checkpointing = flag
        y = model(x, lead)
        (y ** 2).sum().backward()
        results.append((y.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (y_plain, grads_plain), (y_ckpt, grads_ckpt) = results
    assert torch.allclose(y_plain, y_ckpt, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_ckpt[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("window", [0, 4])
def test_bf16_autocast_on_cpu(window: int) -> None:
    model = make_model(window, n_lon=52).eval()
    x, lead = inputs(n_lon=52)
    with torch.no_grad():
        y32 = model(x, lead)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = model(x, lead)
    assert y16.shape == y32.shape
    assert torch.isfinite(y16).all()
    error = (y16.float() - y32).abs().max()
    assert error < 0.05 * y32.abs().max() + 1e-3


@pytest.mark.parametrize("window", [0, 4])
def test_state_dict_round_trip(window: int) -> None:
    model = make_model(window, seed=0, randomise=True).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_model(window, seed=123).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x, lead = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, lead), fresh(x, lead))


def uncached_window_attention(attention, x: torch.Tensor) -> torch.Tensor:
    """The window attention as first written: the mask built from scratch for the call and
    repeated for every sample, softmax written out."""
    from einops import rearrange

    batch, n_lat, n_lon, _ = x.shape
    window, heads = attention.window, attention.num_heads
    qkv = attention._pad_and_roll(attention.qkv(x), n_lat, n_lon)
    padded_lat = qkv.shape[1]
    q, k, v = rearrange(qkv, "b (nh p) (nw q) (three n e) -> three (b nh nw) n (p q) e",
                        p=window, q=window, three=3, n=heads)
    valid = attention._pad_and_roll(torch.ones(n_lat, n_lon, 1, dtype=torch.bool), n_lat, n_lon)
    valid = rearrange(valid, "(nh p) (nw q) 1 -> (nh nw) (p q)", p=window, q=window)
    mask = attention.relative_position_bias()[None].masked_fill(~valid[:, None, None, :],
                                                                float("-inf"))
    mask = mask.repeat(batch, 1, 1, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask
    out = torch.softmax(scores, dim=-1) @ v
    out = rearrange(out, "(b nh nw) n (p q) e -> b (nh p) (nw q) (n e)", b=batch,
                    nh=padded_lat // window, p=window, q=window)
    if attention.shift and attention.periodic_longitude:
        out = torch.roll(out, attention.shift, dims=2)
    west = attention._pad_west
    return attention.proj(out[:, attention.shift:attention.shift + n_lat, west:west + n_lon])


@pytest.mark.parametrize("periodic", [True, False])
def test_window_mask_is_cached_per_shape_and_equals_the_uncached_path(periodic: bool) -> None:
    torch.manual_seed(0)
    model = WeatherTransformer(tiny_config(4), IN_CHANNELS, OUT_CHANNELS, 25, 52,
                               periodic_longitude=periodic)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    for block in model.blocks:  # an unshifted and a shifted block
        attention = block.attention
        tokens = torch.randn(3, 13, 26, 16, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            fast = attention(tokens)
            again = attention(tokens[:1])  # another batch size: the same cached mask
        torch.testing.assert_close(fast, uncached_window_attention(attention, tokens),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, fast[:1], rtol=1e-5, atol=1e-6)
        assert len(attention._padding_masks) == 1  # built once for this shape
        (mask,) = attention._padding_masks.values()
        assert mask.shape[1:3] == (1, 1)  # per window only: broadcast over heads and batch
        attention(torch.randn(1, 9, 26, 16))  # a new shape gets its own mask
        assert len(attention._padding_masks) == 2
