"""The statistics every report uses: paired bootstrap intervals and the Fréchet distance."""
from __future__ import annotations

import numpy as np

N_BOOT = 1000


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a and b (rows = samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # sqrt(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()  # tr sqrt(s1^½ s2 s1^½)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def bootstrap(base: np.ndarray, patched: np.ndarray, stat=np.nanmean, n_boot: int = N_BOOT, seed: int = 0):
    """Paired bootstrap over units -> (lo, hi) of patched and of patched - base (95%)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), (n_boot, len(base)))
    with np.errstate(all="ignore"):
        pb = np.array([stat(patched[i]) for i in idx])
        cb = pb - np.array([stat(base[i]) for i in idx])
    q = lambda x: [float(np.nanpercentile(x, 2.5)), float(np.nanpercentile(x, 97.5))]  # noqa: E731
    return q(pb), q(cb)


def metric(base: np.ndarray, patched: np.ndarray, better: str, what: str) -> dict:
    keep = ~(np.isnan(base) | np.isnan(patched))
    base, patched = base[keep], patched[keep]
    if not len(base):
        return {"base": None, "patched": None, "change": None, "ci_patched": None, "ci_change": None, "n": 0,
                "better": better, "what": what}
    ci_p, ci_c = bootstrap(base, patched)
    return {"base": float(base.mean()), "patched": float(patched.mean()), "change": float(patched.mean() - base.mean()),
            "ci_patched": ci_p, "ci_change": ci_c, "n": int(len(base)), "better": better, "what": what}


FRECHET_DIMS = 16  # a Gaussian in the judge's full 192-d feature space cannot be fitted from ~24 images


def frechet_metric(fb: np.ndarray, fp: np.ndarray, real: np.ndarray) -> dict:
    """Fréchet distance to real images in the top principal components of the real images' judge
    features. Projecting first keeps the covariance estimable from a few dozen generations, so the
    distance moves with the images rather than with sampling noise."""
    centre = real.mean(0)
    _, _, vt = np.linalg.svd(real - centre, full_matrices=False)
    basis = vt[:FRECHET_DIMS].T
    real, fb, fp = ((x - centre) @ basis for x in (real, fb, fp))
    rng = np.random.default_rng(0)
    b, p = frechet(fb, real), frechet(fp, real)
    boots = []
    for _ in range(200):  # fewer resamples: each is an eigendecomposition
        i = rng.integers(0, len(fb), len(fb))
        boots.append((frechet(fp[i], real), frechet(fp[i], real) - frechet(fb[i], real)))
    boots = np.array(boots)
    return {"base": b, "patched": p, "change": p - b,
            "ci_patched": [float(x) for x in np.percentile(boots[:, 0], [2.5, 97.5])],
            "ci_change": [float(x) for x in np.percentile(boots[:, 1], [2.5, 97.5])], "n": int(len(fb)),
            "better": "lower",
            "what": f"Fréchet distance to real toy images, judge features, top {FRECHET_DIMS} principal components "
                    "(general prompts)"}
