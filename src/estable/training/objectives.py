"""Training objectives: the latent-diffusion U-Net loss and the KL-autoencoder loss (with SSIM and a PatchGAN).

Random numbers never come from inside these modules: the trainer draws them (``draw``) from one seeded CPU
generator for the whole global batch and hands each process its slice. So a run is reproducible, resumable
bit for bit, and 2 processes × batch b see exactly the noise 1 process × batch 2b sees.

U-Net (Rombach et al. 2022, eq. 2; Ho et al. 2020, algorithm 1):

    z0 = scaling · (μ + σ·ξ) with (μ, σ) = VAE posterior of x, ξ ~ N(0, I)       (or μ, σ from the cache)
    t ~ U{0, …, T−1},  ε = n + offset · n_c,  n ~ N(0, I), n_c ~ N(0, I) per (sample, channel)
    z_t = sqrt(ᾱ_t) z0 + sqrt(1 − ᾱ_t) ε                                           (Ho et al. eq. 4)
    target = ε  or  v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) z0                             (Salimans & Ho 2022, sec. 4)
    loss = mean_b  w_b · mean_{c,h,w} (U(z_t, t, c) − target)²

with min-SNR-γ weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
eq. 6 and sec. 3.4): SNR = ᾱ/(1 − ᾱ), w = min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v; w = 1 without γ.
Offset noise: Guttenberg 2023 ("Diffusion with offset noise"). Caption dropout replaces a caption's tokens by
those of the empty prompt "" (what the sampler's unconditional branch sees), for classifier-free guidance
(Ho & Salimans 2022, sec. 3.2).

VAE (Rombach et al. 2022, sec. 3.1 and appendix G; Esser et al. 2021 for the adversarial part):

    loss = l1_weight · mean|x − x̂| + kl_weight · KL(q(z|x) ‖ N(0, I)) / (3·H·W) + ssim_weight · (1 − SSIM(x̂, x))
           [+ f(step) · (disc_weight · L_G + L_D)]

All terms are per image element: the LDM code sums its reconstruction loss and its KL over each image and uses
kl_weight = 1e-6; dividing both by the element count 3·H·W keeps that ratio, so kl_weight means the same here.
The adversarial part (off by default) uses the hinge loss (Lim & Ye 2017): L_D = ½(mean relu(1 − D(x)) +
mean relu(1 + D(x̂))), L_G = −mean D(x̂), with a fixed weight (no adaptive weight) and f = 0 before ``start``.
Generator and discriminator are updated in the same optimizer step: L_G sees detached discriminator weights
and L_D a detached reconstruction, so neither term moves the other network.

Two optional terms on the posterior mean μ (B, C, h, w) against latent spikes (issue 11: the shipped encoder puts a
latent pixel of 6–18 × the image's median norm near an object's edge, and the decoder draws a coloured spot there):

    outlier = mean_{b,h,w} relu(‖μ_bhw‖ − k · median_hw ‖μ_b‖)²           (median not differentiated)
    anchor  = mean over the starting encoder's non-outlier pixels of (μ − μ_start)², μ_start from a frozen copy
              of the encoder and quant_conv as they were at the start (``init_from``)

The first flattens the spikes; the second keeps the other latents where a U-Net trained on them expects them.

One optional term inside the decoder against its normalisation "droplet" (Karras et al. 2020, StyleGAN2, sec. 2:
a network can grow one activation very large to set a normalised feature map's statistics as it likes; the shipped
decoder grows one to 100–360 × the median at the latent spike before its last GroupNorms, where it draws the spot):

    droplet = mean over the decoder's GroupNorm inputs a of mean_{b,h,w} relu(‖a_bhw‖ / median_hw ‖a_b‖ − k)²

One optional reconstruction term against the spots themselves, which the mean L1 and SSIM spread over the whole
image (a 3 × 3 spot is 9 of 65,536 pixels at 256²):

    worst = mean over images of the mean of the largest round(f · H·W) (at least one) per-pixel errors mean_c |x − x̂|
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from estable.config import ScheduleConfig
from estable.models.text import TextEncoder
from estable.models.unet import UNet
from estable.models.vae import AutoencoderKL
from estable.sampling.schedules import alphas_cumprod

# ---------------------------------------------------------------------------------------------------------
# SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment: from error visibility to
# structural similarity", eq. 13 with the 11×11 Gaussian window of σ = 1.5 of sec. III-C, averaged as eq. 17)
# ---------------------------------------------------------------------------------------------------------


def gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,); the 2-D window is its outer product (it is separable)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image: (B, C, H, W) × 2 → (B,). ``data_range`` L = 2 for images in [-1, 1].

    Local statistics are Gaussian-weighted over 'valid' windows (no padding, as the authors' MATLAB code):

        SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),  C1 = (k1 L)², C2 = (k2 L)²
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {window_size}px window")
    c = x.shape[1]
    g = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    kernel = torch.outer(g, g).expand(c, 1, window_size, window_size)  # (C, 1, k, k) depthwise

    def blur(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, C, H-k+1, W-k+1)
        # Never under bf16/fp16 autocast: σ² = E[x²] − μ² cancels catastrophically in 8 mantissa bits, which
        # sends SSIM's denominator to zero and its gradients to thousands (a bf16 VAE run diverged so).
        with torch.autocast(t.device.type, enabled=False):
            return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x * mu_x
    syy = blur(y * y) - mu_y * mu_y
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return smap.mean(dim=(1, 2, 3))  # (B,)


# ---------------------------------------------------------------------------------------------------------
# Diffusion targets and weights
# ---------------------------------------------------------------------------------------------------------


def noisy_latents_and_target(
    z0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, objective: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, target) for clean latents z0 (B, C, h, w), noise ε and ᾱ_t (B,) (float64 is fine: cast here)."""
    a = alpha_bar.to(torch.float64).sqrt().to(z0.dtype).view(-1, 1, 1, 1)  # sqrt(ᾱ)      (B, 1, 1, 1)
    s = (1 - alpha_bar.to(torch.float64)).sqrt().to(z0.dtype).view(-1, 1, 1, 1)  # sqrt(1 − ᾱ)
    z_t = a * z0 + s * noise  # Ho et al. 2020, eq. 4
    if objective == "eps":
        return z_t, noise
    if objective == "v":
        return z_t, a * noise - s * z0  # Salimans & Ho 2022, sec. 4
    raise ValueError(f"objective must be 'eps' or 'v', not {objective!r}")


def min_snr_weights(alpha_bar: torch.Tensor, gamma: float | None, objective: str) -> torch.Tensor:
    """Per-sample loss weights (B,) of min-SNR-γ (Hang et al. 2023); ones when ``gamma`` is None.

    SNR = ᾱ/(1 − ᾱ). Relative to an x0-loss, the ε-loss carries a factor SNR and the v-loss a factor SNR + 1, so
    the weights that turn both into min(SNR, γ)·‖x0 error‖² are min(SNR, γ)/SNR (ε) and min(SNR, γ)/(SNR + 1) (v).
    """
    ab = alpha_bar.to(torch.float64)
    if gamma is None:
        return torch.ones_like(ab, dtype=torch.float32)
    snr = ab / (1 - ab)
    clipped = torch.clamp(snr, max=float(gamma))
    if objective == "eps":  # at zero SNR (a zero-terminal-SNR schedule's last step) ε says nothing of x0: weight 0
        w = torch.where(snr > 0, clipped / snr, torch.zeros_like(snr))
    else:
        w = clipped / (snr + 1)
    return w.to(torch.float32)


def late_timestep_weights(num_timesteps: int, portion: float, multiplier: float) -> torch.Tensor | None:
    """Sampling weights of the training timesteps: the last ``portion`` of them (the noisiest) ``multiplier`` times
    as likely as the rest; None when that is uniform (draws then use ``torch.randint`` as before)."""
    late = round(portion * num_timesteps)
    if late == 0 or multiplier == 1:
        return None
    w = torch.ones(num_timesteps, dtype=torch.float64)
    w[num_timesteps - late:] = multiplier
    return w


class UNetObjective(nn.Module):
    """Wraps the trained U-Net with the frozen VAE and text encoder; ``forward(batch, draws) -> (loss, metrics)``.

    batch: ``input_ids`` (B, L) and either ``pixel_values`` (B, 3, H, W) in [-1, 1] or cached posterior
    ``latent_mean``/``latent_std`` (B, C, h, w). draws: from :meth:`draw`, sliced to this process's rows.
    """

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder, empty_ids: torch.Tensor, *,
                 schedule: ScheduleConfig, objective: str = "eps", min_snr_gamma: float | None = None,
                 offset_noise: float = 0.0, caption_dropout: float = 0.0, clip_skip: int = 1,
                 latent_size: int, train_text: bool = False, late_timesteps: tuple[float, float] = (0.0, 1.0),
                 role_contrast: tuple[float, float, int] = (0.0, 0.2, 0)) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae.requires_grad_(False).eval()
        self.train_text = train_text  # the text encoder learns jointly with the U-Net, or stays frozen
        self.text_encoder = text_encoder.requires_grad_(train_text).train(train_text)
        self.register_buffer("empty_ids", empty_ids.reshape(1, -1).long(), persistent=False)  # (1, L)
        self.alphas_cumprod = alphas_cumprod(schedule)  # (T,) float64, CPU: what the draws' timesteps come from
        # the same table on the run's device (it moves with the objective): ᾱ_t is looked up where t is, with no copy
        # back to the host (which would wait for the GPU every step)
        self.register_buffer("ab_table", self.alphas_cumprod.clone(), persistent=False)
        self.objective, self.min_snr_gamma = objective, min_snr_gamma
        self.offset_noise, self.caption_dropout, self.clip_skip = offset_noise, caption_dropout, clip_skip
        self.latent_shape = (vae.config.latent_channels, latent_size, latent_size)
        self.scaling = vae.config.scaling_factor
        self.t_weights = late_timestep_weights(len(self.alphas_cumprod), *late_timesteps)  # None: uniform t
        self.contrast_weight, self.contrast_margin, self.contrast_min_t = role_contrast  # weight 0: off

    def train(self, mode: bool = True) -> UNetObjective:
        super().train(mode)
        self.vae.eval()  # frozen parts stay in eval mode
        self.text_encoder.train(mode and self.train_text)
        return self

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """All random numbers of one micro-step for ``n`` samples (always in this order), on the CPU."""
        c, h, w = self.latent_shape
        if self.t_weights is None:
            t = torch.randint(0, len(self.alphas_cumprod), (n,), generator=generator)
        else:
            t = torch.multinomial(self.t_weights, n, replacement=True, generator=generator)
        d = {
            "t": t,
            "posterior": torch.randn((n, c, h, w), generator=generator),
            "noise": torch.randn((n, c, h, w), generator=generator),
        }
        if self.offset_noise > 0:
            d["offset"] = torch.randn((n, c, 1, 1), generator=generator)
        if self.caption_dropout > 0:
            d["drop"] = torch.rand((n,), generator=generator)
        return d

    @torch.no_grad()
    def clean_latents(self, batch: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        """z0 = scaling · (μ + σ·ξ), from the cache or by encoding the pixels. (B, C, h, w) float32."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            posterior = self.vae.encode(batch["pixel_values"])
            mean, std = posterior.mean, posterior.std
        return (mean.float() + std.float() * xi) * self.scaling

    def context(self, input_ids: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        if drop is not None:
            dropped = (drop < self.caption_dropout).view(-1, 1)  # (B, 1)
            input_ids = torch.where(dropped, self.empty_ids.expand_as(input_ids), input_ids)
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            return self.text_encoder.encode(input_ids, clip_skip=self.clip_skip)  # (B, L, d)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for timesteps ``t`` (B,), float64, on the objective's device."""
        return self.ab_table[t.to(self.ab_table.device)]

    def noise(self, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        eps = draws["noise"]
        if self.offset_noise > 0:
            eps = eps + self.offset_noise * draws["offset"]  # per-(sample, channel) constant shift
        return eps

    def forward(self, batch: dict[str, torch.Tensor], draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        z0 = self.clean_latents(batch, draws["posterior"])  # (B, C, h, w)
        ctx = self.context(batch["input_ids"], draws.get("drop"))  # (B, L, d)
        t = draws["t"]  # (B,) int64
        ab = self.alpha_bar(t)  # (B,) float64
        z_t, target = noisy_latents_and_target(z0, self.noise(draws), ab, self.objective)
        pred = self.unet(z_t, t, ctx).float()  # (B, C, h, w)
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        weights = min_snr_weights(ab, self.min_snr_gamma, self.objective).to(per_sample.device)
        loss = (weights * per_sample).mean()
        metrics = {"mse": per_sample.detach().mean()}
        if self.contrast_weight > 0 and "swapped_ids" in batch:
            rows = batch["swapped"].bool() & (t.to(z_t.device) >= self.contrast_min_t)
            if "drop" in draws:  # a dropped caption has no roles to contrast
                rows &= (draws["drop"] >= self.caption_dropout).to(rows.device)
            term = torch.zeros((), device=loss.device)  # (logged as 0 when no row qualifies)
            if bool(rows.any()):
                term = self.role_contrast(z_t[rows], t[rows.cpu()], batch["swapped_ids"][rows], target[rows],
                                          per_sample[rows])
                loss = loss + self.contrast_weight * term
            metrics["role_contrast"] = term.detach()
        return loss, metrics

    def role_contrast(self, z_t: torch.Tensor, t: torch.Tensor, swapped_ids: torch.Tensor, target: torch.Tensor,
                      mse: torch.Tensor) -> torch.Tensor:
        """mean relu(margin − (mse_swapped − mse)/mse) over the given rows: the U-Net's error under the contrast
        caption (the objects exchanged, or one object as a look-alike shape: ``role_contrast.kind``) held at least
        ``margin`` (relative) above its error under the true caption."""
        pred = self.unet(z_t, t, self.context(swapped_ids, None)).float()
        mse_swapped = (pred - target).pow(2).mean(dim=(1, 2, 3))  # (n,)
        gap = (mse_swapped - mse) / mse.detach().clamp_min(1e-8)
        return F.relu(self.contrast_margin - gap).mean()


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, sec. 3.2.2): 4×4 convolutions, stride 2 then 1, one logit per patch.

    GroupNorm(1, C) stands in for the original BatchNorm so that the network behaves the same with any batch
    size and under DDP (no running statistics to synchronise).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(1, out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h', w') logits


def _pixel_norms(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """‖μ‖ over channels per latent pixel, (B, h·w), and each image's median of it, (B, 1), not differentiated."""
    n = mean.float().norm(dim=1).flatten(1)
    return n, n.detach().median(dim=1, keepdim=True).values


def latent_norm_ratios(mean: torch.Tensor) -> torch.Tensor:
    """‖μ‖ over channels divided by the image's median norm (not differentiated): (B, C, h, w) → (B, h·w)."""
    n, median = _pixel_norms(mean)
    return n / median.clamp_min(1e-8)


def outlier_penalty(mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """mean relu(‖μ‖ − ratio · median ‖μ‖)² over images and latent pixels: 0 unless a pixel's norm exceeds
    ``ratio`` times its image's median norm; the median is a fixed reference, so only the outliers are pushed."""
    n, median = _pixel_norms(mean)
    return F.relu(n - ratio * median).pow(2).mean()


def worst_pixels(x: torch.Tensor, x_hat: torch.Tensor, fraction: float) -> torch.Tensor:
    """The mean absolute error (over channels) of each image's worst ``fraction`` of pixels, averaged over the
    batch: a small spot of large error weighs in it as much as it does in the image, where the mean L1 dilutes it."""
    e = (x_hat.float() - x.float()).abs().mean(dim=1).flatten(1)  # (B, H·W)
    k = max(1, round(fraction * e.shape[1]))
    return e.topk(k, dim=1).values.mean()


def droplet_terms(activations: list[torch.Tensor], ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty, peak) over feature maps (B, C, H, W): the penalty is the mean over maps of mean relu(‖a‖ / median
    ‖a‖ − ratio)² over images and positions (norm over channels, each image's median not differentiated), 0 unless
    a position stands out by more than ``ratio``; the peak is the largest position's ratio, averaged over images
    and maps (not differentiated)."""
    ratios = [latent_norm_ratios(a) for a in activations]
    penalty = torch.stack([F.relu(r - ratio).pow(2).mean() for r in ratios]).mean()
    peak = torch.stack([r.detach().amax(dim=1).mean() for r in ratios]).mean()
    return penalty, peak


class VAEObjective(nn.Module):
    """Wraps the trained autoencoder (and optional discriminator); ``forward(batch, draws, step)``.

    ``outlier_weight`` > 0 adds the latent-outlier penalty (``outlier_ratio`` = k); ``anchor_weight`` > 0 adds the
    anchor to a frozen copy of the encoder as ``vae`` is now (the starting weights: build this after loading them).
    ``droplet_weight`` > 0 adds the droplet penalty on the inputs of the decoder's GroupNorms (``droplet_ratio`` = k),
    taken by forward pre-hooks while ``forward`` decodes (not during a checkpointed recomputation).
    """

    def __init__(self, vae: AutoencoderKL, *, l1_weight: float = 1.0, kl_weight: float = 1e-6,
                 ssim_weight: float = 0.2, discriminator: PatchDiscriminator | None = None,
                 disc_start: int = 0, disc_weight: float = 0.5, train_encoder: bool = True,
                 outlier_weight: float = 0.0, outlier_ratio: float = 3.0, anchor_weight: float = 0.0,
                 droplet_weight: float = 0.0, droplet_ratio: float = 16.0, worst_weight: float = 0.0,
                 worst_fraction: float = 0.005) -> None:
        super().__init__()
        self.vae = vae
        self.train_encoder = train_encoder
        self.discriminator = discriminator
        self.l1_weight, self.kl_weight, self.ssim_weight = l1_weight, kl_weight, ssim_weight
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.outlier_weight, self.outlier_ratio, self.anchor_weight = outlier_weight, outlier_ratio, anchor_weight
        self.anchor = None
        if anchor_weight > 0:  # frozen, in eval mode, never saved (the trainer saves ``vae`` only)
            frozen = nn.Sequential(copy.deepcopy(vae.encoder), copy.deepcopy(vae.quant_conv))
            self.anchor = frozen.requires_grad_(False).eval()
        self.droplet_weight, self.droplet_ratio = droplet_weight, droplet_ratio
        self.worst_weight, self.worst_fraction = worst_weight, worst_fraction
        self._norm_inputs: list[torch.Tensor] | None = None  # filled while forward decodes
        if droplet_weight > 0:
            for m in vae.decoder.modules():
                if isinstance(m, nn.GroupNorm):
                    m.register_forward_pre_hook(self._keep_norm_input)

    def _keep_norm_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self._norm_inputs is not None:
            self._norm_inputs.append(args[0])

    def train(self, mode: bool = True) -> VAEObjective:
        super().train(mode)
        if self.anchor is not None:
            self.anchor.eval()
        return self

    def latent_terms(self, x: torch.Tensor, mean: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outlier and anchor terms (those switched on) and the batch's mean peak / median latent norm."""
        terms = {"peak_ratio": latent_norm_ratios(mean).detach().amax(dim=1).mean()}
        if self.outlier_weight > 0:
            terms["outlier"] = outlier_penalty(mean, self.outlier_ratio)
        if self.anchor is not None:
            with torch.no_grad():
                start = self.anchor(x).chunk(2, dim=1)[0].float()  # the starting posterior mean
                keep = (latent_norm_ratios(start) <= self.outlier_ratio).view(-1, 1, *start.shape[2:])
                keep = keep.expand_as(start).float()
            terms["anchor"] = ((mean.float() - start).pow(2) * keep).sum() / keep.sum().clamp_min(1)
        return terms

    def draw(self, n: int, generator: torch.Generator, image_size: int) -> dict[str, torch.Tensor]:
        c = self.vae.config.latent_channels
        h = image_size // self.vae.config.downsample_factor
        return {"posterior": torch.randn((n, c, h, h), generator=generator)}

    def reconstruction_terms(self, x: torch.Tensor, x_hat: torch.Tensor, kl_sum: torch.Tensor) -> dict[str, Any]:
        """The L1, KL (per element) and SSIM terms and their weighted sum."""
        l1 = (x_hat.float() - x.float()).abs().mean()
        kl = kl_sum.float().mean() / (x[0].numel())  # KL summed over each latent, per image element
        s = ssim(x_hat.float(), x.float()).mean()
        total = self.l1_weight * l1 + self.kl_weight * kl + self.ssim_weight * (1 - s)
        terms = {"loss": total, "l1": l1, "kl": kl, "ssim": s}
        if self.worst_weight > 0:
            terms["worst"] = worst_pixels(x, x_hat, self.worst_fraction)
            terms["loss"] = total + self.worst_weight * terms["worst"]
        return terms

    def forward(self, batch: dict[str, torch.Tensor], draws: dict[str, torch.Tensor],
                step: int = 0) -> tuple[torch.Tensor, dict]:
        x = batch["pixel_values"]  # (B, 3, H, W)
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * draws["posterior"].to(posterior.mean.dtype)  # reparametrised sample
        self._norm_inputs = [] if self.droplet_weight > 0 else None
        try:
            x_hat = self.vae.decode(z)
        finally:
            norm_inputs, self._norm_inputs = self._norm_inputs, None
        terms = self.reconstruction_terms(x, x_hat, posterior.kl())
        loss = terms.pop("loss")
        if norm_inputs:
            terms["droplet"], terms["decoder_peak"] = droplet_terms(norm_inputs, self.droplet_ratio)
            loss = loss + self.droplet_weight * terms["droplet"]
        if self.outlier_weight > 0 or self.anchor is not None:
            terms.update(self.latent_terms(x, posterior.mean))
            loss = loss + self.outlier_weight * terms.get("outlier", 0) + self.anchor_weight * terms.get("anchor", 0)
        metrics = {k: v.detach() for k, v in terms.items()}
        if self.discriminator is not None:
            on = 1.0 if step >= self.disc_start else 0.0
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            g_adv = -functional_call(self.discriminator, frozen, (x_hat,)).float().mean()  # L_G, D fixed
            real = self.discriminator(x).float()
            fake = self.discriminator(x_hat.detach()).float()
            d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())  # hinge L_D
            loss = loss + on * (self.disc_weight * g_adv + d_loss)
            metrics.update(g_adv=g_adv.detach(), d_loss=d_loss.detach())
        return loss, metrics


def empty_prompt_ids(tokenizer: Any) -> torch.Tensor:
    """Token ids of "" (bos, eos, padding): what the U-Net sees for a dropped caption. (1, L)"""
    return tokenizer([""])


__all__ = [
    "PatchDiscriminator",
    "UNetObjective",
    "VAEObjective",
    "droplet_terms",
    "empty_prompt_ids",
    "gaussian_window",
    "latent_norm_ratios",
    "min_snr_weights",
    "noisy_latents_and_target",
    "outlier_penalty",
    "ssim",
]
