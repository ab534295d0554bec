"""The built-in offline sample: a small CIFAKE look-alike made from photographs that ship inside installed packages.

REAL images are random box-downsampled 32x32 crops (with flips) of those photographs. FAKE images come from a
generator shaped like a latent-diffusion decoder and fitted on train-side real crops only:

* encode: a 2x box-downsample of a real crop to a 16x16 latent, plus Gaussian noise on the latent;
* decode: a ridge-regression upsampler predicting each 2x2 output block from the 3x3 latent neighbourhood around
  it, plus a high-frequency texture: a stationary Gaussian with the power spectrum and colour covariance of the
  real residuals (real - decode(encode(real))), scaled per 4x4 cell to the residual energy that a fitted log-linear
  model predicts from the decoded image's local contrast.

Both classes then carry two cues, each in one phase for FAKE and the opposite phase for REAL, with equal energy in
both classes, so anything blind to phase (brightness, contrast, Laplacian energy, the magnitude spectrum) sees no
difference:

* **The 2x2 phase mark, the robust cue**: a luminance checkerboard whose amplitude is drawn per image from the
  tiers of ``sample.mark``. On the fakes it is the mark a stride-2 transposed convolution leaves (Odena et al.,
  "Deconvolution and checkerboard artifacts", 2016); on the reals it stands for the 2x2-periodic trace of a
  camera's colour-filter demosaicing (Popescu and Farid, 2005). A tier may hold weak marks, which a small attack
  erases, or the other class's mark (a photograph resampled by an upsampler, a fake through a camera-like
  pipeline): the robust cue is then right only most of the time, as in Tsipras et al., "Robustness may be at odds
  with accuracy" (2019). The reference classifier :func:`mark_score` (the mean of the image times the
  checkerboard) moves by at most epsilon under an L-infinity change of epsilon, so it is provably right under any
  attack of epsilon on the images whose mark has the class's phase and an amplitude above epsilon
  (:func:`certified_accuracy`).
* **Line interleaving, a non-robust cue** (``sample.lines``): alternate rows a few grey levels up and down on
  every image, with the class's sign (orthogonal to the mark's checkerboard, so it moves no mark score), as a
  decoder that upsamples rows apart from columns leaves on its fakes, and an interlaced sensor readout on
  photographs. It tells the class of every clean image, the mislabelled marks included, and an attack of twice its
  amplitude flips it: the kind of feature an undefended model leans on and a robust one must give up (Ilyas et
  al., "Adversarial examples are not bugs, they are features", 2019), at the price of the images whose mark
  lies. The texture fingerprint above is another, fainter non-robust cue.

So with the default tiers, clean accuracy can come from every cue and robust accuracy only from the marks that
hold, and both bounds on it are known by construction (:func:`robustness_bounds`: the reference classifier's
certified accuracy below, the best any detector of the two cues can do above; ``bench/sample.py``,
``sample_bounds`` in metrics/evaluate.json). ``mark: 12`` with ``lines: 0`` is the easy variant, every image
robust at 8/255. Real results need the real data and real weights. Train and test crops come from disjoint
photographs, so the test set measures generalisation to unseen scenes.

**Byte-identical on every CPU.** All arithmetic is float64, and the colour basis has a fixed sign (eigenvectors
are only defined up to one). BLAS picks its kernels by CPU and they sum in different orders: in float32 that moved
pixels across a rounding boundary (bench/README.md#samplepy counts the files that differed); in float64 the
differences are far below a grey level and do not reach a rounding boundary in practice. ``tests/data/test_sample.py``
checks a golden hash, also under other OpenBLAS kernels and with numpy's AVX-512 code paths switched off.

Generation timed with ``python bench/sample.py``; the bounds an attacker of each size leaves are
:func:`robustness_bounds` (evaluate's ``sample_bounds``).
"""
from __future__ import annotations

import dataclasses
import functools
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import config
from pipeline.classes import CLASSES
from pipeline.data import filetree

SPLITS = ("train", "test")
# Disjoint scenes: test photographs are never seen by the generator's fit nor by a classifier's training data.
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "china",
                "grace_hopper")
TEST_PHOTOS = ("chelsea", "flower", "stereo_motorcycle")
MAX_FACTOR = 8        # crops are (32*k)^2 squares box-downsampled by k in 1..MAX_FACTOR
LATENT_NOISE = 1.0    # std of the latent noise, 8-bit units; 2 or more makes flat areas visibly grainy
# The phase mark's pattern: +1/-1 in a 2x2 checkerboard, the same in all three channels (luminance: JPEG's 4:2:0
# chroma subsampling would erase a colour one). FAKE images get +mark times it, REAL images -mark times it.
CHECKERBOARD = ((np.indices((32, 32)).sum(0) % 2) * 2 - 1).astype(np.float64)[..., None]
# The non-robust cue's pattern: alternate rows +1/-1, luminance again; orthogonal to the mark's checkerboard.
LINES = ((np.indices((32, 32))[0] % 2) * 2 - 1).astype(np.float64)[..., None]
FIT_CROPS = 2048      # fixed, so the generator does not change with the sample size
BATCH = 2048
_CELL = 4             # texture energy is modelled per 4x4 cell


def cifake_name(n: int) -> str:
    """CIFAKE's file names: 0000.jpg, 0000 (2).jpg, ..., 0000 (10).jpg, 0001.jpg, ..."""
    i, j = divmod(n, 10)
    return f"{i:04d}.jpg" if j == 0 else f"{i:04d} ({j + 1}).jpg"


def load_photo(name: str) -> np.ndarray:
    """One shipped RGB photograph as uint8 (H, W, 3), halved until its longer side is at most 800 px."""
    if name == "grace_hopper":
        from matplotlib import cbook

        with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
            img = im.convert("RGB")
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = Image.fromarray(load_sample_image(f"{name}.jpg"))
    else:
        import skimage.data

        arr = getattr(skimage.data, name)()
        img = Image.fromarray(arr[0] if isinstance(arr, tuple) else arr)  # stereo_motorcycle: (left, right, disp)
    # Keep scenes at a comparable scale: a 1411 px retina would otherwise give only smooth close-ups.
    while max(img.size) > 800:
        img = img.reduce(2)
    return np.asarray(img, dtype=np.uint8)


class Cropper:
    """Random 32x32 crops of a set of photographs: a (32k)^2 window box-averaged by k, flipped half the time."""

    def __init__(self, photos: list[np.ndarray]):
        # Integral images make any box average four lookups; int32 holds 800*800*255.
        self.integrals = [np.pad(p.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0), (0, 0))) for p in photos]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` crops as float64 (n, 32, 32, 3) in [0, 255]."""
        photo = rng.integers(0, len(self.integrals), n)
        factor = rng.integers(1, MAX_FACTOR + 1, n)
        pos = rng.random((n, 2))
        flip = rng.random(n) < 0.5
        corners = np.empty((n, 33, 33, 3), np.int32)
        for i in range(n):
            s, k = self.integrals[photo[i]], int(factor[i])
            k = min(k, (min(s.shape[:2]) - 1) // 32)
            y, x = (pos[i] * (np.array(s.shape[:2]) - 32 * k)).astype(int)
            corners[i] = s[y:y + 32 * k + 1:k, x:x + 32 * k + 1:k]
            factor[i] = k
        box = corners[:, 1:, 1:] - corners[:, :-1, 1:] - corners[:, 1:, :-1] + corners[:, :-1, :-1]
        out = box.astype(np.float64) / (factor.astype(np.float64) ** 2)[:, None, None, None]
        out[flip] = out[flip, :, ::-1]
        return out


def encode(x: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) -> (n, 16, 16, 3) latent: a 2x box-downsample."""
    return (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4


def _pool(a: np.ndarray, s: int) -> np.ndarray:
    """Mean over s x s cells of (n, H, W): two matmuls, much faster than a reshaped mean."""
    h, w = a.shape[1:]
    rows = np.kron(np.eye(h // s), np.full((1, s), 1 / s))
    cols = np.kron(np.eye(w // s), np.full((1, s), 1 / s))
    return rows @ a.astype(np.float64, copy=False) @ cols.T


def _neighbourhoods(z: np.ndarray) -> np.ndarray:
    """(n, 16, 16, 3) -> (n, 16, 16, 28): the 3x3x3 latent neighbourhood of each latent pixel, plus a bias 1."""
    zp = np.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    cols = [zp[:, dy:dy + 16, dx:dx + 16] for dy in range(3) for dx in range(3)]
    return np.concatenate(cols + [np.ones_like(z[..., :1])], axis=-1)


def _to_blocks(x: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) -> (n, 16, 16, 12): each 2x2x3 block as one row."""
    return x.reshape(len(x), 16, 2, 16, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(len(x), 16, 16, 12)


def _from_blocks(b: np.ndarray) -> np.ndarray:
    return b.reshape(len(b), 16, 16, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(len(b), 32, 32, 3)


def _cell_contrast(d: np.ndarray) -> np.ndarray:
    """Mean absolute gradient of an image per 4x4 cell: (n, 32, 32, 3) -> (n, 8, 8)."""
    g = np.abs(np.diff(d, axis=1, append=d[:, -1:])) + np.abs(np.diff(d, axis=2, append=d[:, :, -1:]))
    return _pool(g.mean(-1), _CELL)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """The fitted generator: a linear latent upsampler and a Gaussian model of what it cannot restore."""

    weights: np.ndarray   # (28, 12): latent neighbourhood -> 2x2x3 output block
    colour: np.ndarray    # (3, 3): orthonormal basis decorrelating the residual's colour channels
    filters: np.ndarray   # (3, 1024, 1024): white noise -> texture with the residual's spectrum, per colour component
    slope: float          # log cell energy = slope * log(cell contrast + 0.1) + bias
    bias: float

    @classmethod
    def fit(cls, x: np.ndarray, ridge: float = 1.0) -> Decoder:
        """Fit on real crops ``x`` (n, 32, 32, 3) float in [0, 255]."""
        feats = _neighbourhoods(encode(x)).reshape(-1, 28)
        rows = np.concatenate([feats, _to_blocks(x).reshape(-1, 12)], axis=1)
        moments = np.zeros((28, 40))
        for i in range(0, len(rows), 1 << 18):  # float64 sums in chunks: precise without a 2x memory copy
            chunk = rows[i:i + (1 << 18)].astype(np.float64)
            moments += chunk[:, :28].T @ chunk  # one product: numpy's A.T @ A special case is much slower here
        weights = np.linalg.solve(moments[:, :28] + ridge * np.eye(28), moments[:, 28:])
        decoded = _from_blocks(_neighbourhoods(encode(x)) @ weights)
        resid = x - decoded
        _, colour = np.linalg.eigh(np.einsum("nhwc,nhwd->cd", resid, resid, dtype=np.float64) / resid[..., 0].size)
        # An eigenvector's sign is arbitrary and LAPACK builds differ in it: fix it (largest entry positive).
        colour *= np.sign(colour[np.abs(colour).argmax(0), np.arange(3)])
        comps = np.ascontiguousarray((resid @ colour).transpose(0, 3, 1, 2))  # FFTs are fastest on the last axes
        amplitude = np.sqrt((np.abs(np.fft.rfft2(comps)) ** 2).mean(0))
        # Filtering as a matrix: row p is the filter's response to an impulse at pixel p. Applying it is one BLAS
        # matmul per batch instead of an FFT per image.
        impulses = np.eye(32 * 32).reshape(-1, 32, 32)
        filters = np.stack([np.fft.irfft2(np.fft.rfft2(impulses) * a, s=(32, 32)).reshape(-1, 32 * 32)
                            for a in amplitude])
        # Scale so that texture has mean square 1 over pixels and channels; the energy model sets its level.
        filters *= np.sqrt(3 / (filters[:, 0] ** 2).sum())
        energy = np.log(_pool((resid ** 2).mean(-1), _CELL) + 1e-3).ravel()
        contrast = np.log(_cell_contrast(decoded) + 0.1).ravel()
        slope, bias = np.polyfit(contrast, energy, 1)
        return cls(weights, colour, filters, float(slope), float(bias))

    def decode(self, z: np.ndarray) -> np.ndarray:
        return _from_blocks(_neighbourhoods(z) @ self.weights)

    def texture(self, rng: np.random.Generator, decoded: np.ndarray) -> np.ndarray:
        """Gaussian high-frequency texture, its energy per 4x4 cell set by the decoded image's local contrast."""
        white = rng.standard_normal((3, len(decoded), 32 * 32), dtype=np.float32).astype(np.float64)
        tex = np.matmul(white, self.filters).transpose(1, 2, 0).reshape(decoded.shape) @ self.colour.T
        energy = np.exp(self.slope * np.log(_cell_contrast(decoded) + 0.1) + self.bias)
        amp = np.sqrt(energy).repeat(_CELL, 1).repeat(_CELL, 2)[..., None]
        return tex * amp

    def generate(self, rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
        """A FAKE for each real crop: encode, perturb the latent, decode, add texture (the mark comes later)."""
        z = encode(x)
        z = z + LATENT_NOISE * rng.standard_normal(z.shape, dtype=np.float32)
        decoded = self.decode(z)
        return decoded + self.texture(rng, decoded)


def mark_amplitudes(rng: np.random.Generator, n: int, tiers: tuple[config.MarkTier, ...], label: int) -> np.ndarray:
    """One amplitude per image for ``n`` images of class ``label``: each tier gets its share of them exactly
    (largest remainder), drawn uniformly from its range, in a random order."""
    shares = np.array([t.share(label) for t in tiers]) * n
    counts = np.floor(shares).astype(int)
    counts[np.argsort(counts - shares, kind="stable")[: n - counts.sum()]] += 1
    amplitudes = np.concatenate([t.amplitude[0] + (t.amplitude[1] - t.amplitude[0]) * rng.random(c)
                                 for t, c in zip(tiers, counts)])
    return rng.permutation(amplitudes)


def add_mark(x: np.ndarray, label: int, amplitude: np.ndarray | float, headroom: float,
             lines: float = 0.0) -> np.ndarray:
    """The 2x2 phase mark, +``amplitude`` on FAKE (1) and -``amplitude`` on REAL (0), per image, and the line
    pattern of amplitude ``lines`` with the same signs. The range is first squeezed into [headroom, 255 - headroom]
    (``headroom`` at least the largest amplitude plus ``lines``), so that no pixel clips: clipping would shave the
    mark, and with it the certified margin."""
    sign = 1.0 if label == 1 else -1.0
    amplitude = np.reshape(amplitude, (-1, 1, 1, 1))
    out = headroom + x * ((255.0 - 2.0 * headroom) / 255.0) + sign * amplitude * CHECKERBOARD
    return out + sign * lines * LINES if lines else out


@functools.lru_cache(maxsize=1)
def _croppers() -> dict[str, Cropper]:
    return {split: Cropper([load_photo(p) for p in photos])
            for split, photos in (("train", TRAIN_PHOTOS), ("test", TEST_PHOTOS))}


@functools.lru_cache(maxsize=2)  # a pure function of the seed: fit once per process
def fitted_decoder(seed: int) -> Decoder:
    """The generator for ``seed``, fitted on ``FIT_CROPS`` crops of the train photographs only."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(5)[0])
    return Decoder.fit(_croppers()["train"].sample(rng, FIT_CROPS))


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_sample(out: Path, cfg: config.Sample, seed: int, progress: bool = True) -> dict[str, int]:
    """Write the sample in CIFAKE layout to ``out`` (a zip if it ends in .zip, else a folder), replacing it whole;
    return the count per ``split/CLASS``.

    Deterministic: the same ``cfg`` and ``seed`` give byte-identical files (with the pinned numpy, Pillow and the
    packages the photographs come from; on any CPU, see the module's docstring).
    """
    # One independent stream per purpose, so e.g. the test set does not change when train_per_class does.
    # Children 5-8 draw the marks' amplitudes: spawn keys fix each child, so the first five stay what they were.
    _, *job_ss = np.random.SeedSequence(seed).spawn(5)
    mark_ss = np.random.SeedSequence(seed).spawn(9)[5:]
    headroom = max(abs(a) for t in cfg.mark for a in t.amplitude) + cfg.lines
    croppers, decoder = _croppers(), fitted_decoder(seed)
    per_class = {"train": cfg.train_per_class, "test": cfg.test_per_class}
    jobs = [(split, cls) for split in SPLITS for cls in CLASSES]
    counts: dict[str, int] = {}
    with tqdm(total=2 * sum(per_class.values()), unit="img", desc="sample", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=2) as pool, filetree.writer(out) as put:  # Pillow encodes without the GIL
        for (split, cls), ss, mss in zip(jobs, job_ss, mark_ss):
            rng, n = np.random.default_rng(ss), per_class[split]
            amplitudes = mark_amplitudes(np.random.default_rng(mss), n, cfg.mark, CLASSES.index(cls))
            for start in range(0, n, BATCH):
                x = croppers[split].sample(rng, min(BATCH, n - start))
                if cls == "FAKE":
                    x = decoder.generate(rng, x)
                x = add_mark(x, CLASSES.index(cls), amplitudes[start:start + len(x)], headroom, cfg.lines)
                pixels = np.clip(np.rint(x), 0, 255).astype(np.uint8)
                for i, data in enumerate(pool.map(_jpeg, pixels, [cfg.jpeg_quality] * len(pixels))):
                    put(f"{split}/{cls}/{cifake_name(start + i)}", data)
                bar.update(len(pixels))
            counts[f"{split}/{cls}"] = n
    return counts


def fingerprint_features(x: np.ndarray) -> np.ndarray:
    """Five high-frequency statistics per image (n, 32, 32, 3) -> (n, 5) that see the decoder's fingerprint.

    Used by the tests and ``bench/sample.py`` to check that the sample is learnable: log Laplacian energy, log
    energy lost by 2x and 4x box-downsampling, Laplacian kurtosis, and how well local high-frequency energy
    follows local low-frequency contrast (real detail sits on edges; the generated texture does not).
    """
    n, g = len(x), x.astype(np.float32).mean(-1)
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    lap_energy = (lap ** 2).mean((1, 2))
    feats = [np.log(lap_energy + 1e-3), np.log((lap ** 4).mean((1, 2)) / (lap_energy ** 2 + 1e-6) + 1e-3)]
    for s in (2, 4):
        low = _pool(g, s)
        feats.append(np.log(((g - low.repeat(s, 1).repeat(s, 2)) ** 2).mean((1, 2)) + 1e-3))
    # Per 4x4 cell: high-frequency energy against the contrast of the 8x8 low-pass image (``low`` is 4x here).
    hf = np.log(_pool(np.pad(lap ** 2, ((0, 0), (1, 1), (1, 1))), 4) + 1e-2)
    lf = np.log(np.abs(np.diff(low, axis=1, append=low[:, -1:])) + np.abs(np.diff(low, axis=2, append=low[:, :, -1:]))
                + 0.1)
    hf, lf = hf.reshape(n, -1), lf.reshape(n, -1)
    hf, lf = hf - hf.mean(1, keepdims=True), lf - lf.mean(1, keepdims=True)
    feats.append((hf * lf).mean(1) / (hf.std(1) * lf.std(1) + 1e-6))
    return np.stack(feats, 1)
