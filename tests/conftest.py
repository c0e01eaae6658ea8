"""Generated tiny datasets in the official on-disk layouts (never downloaded), and method-run helpers."""
import hashlib
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# label ids (Cityscapes encoding) used to paint generated GTA5 / Cityscapes labels
LABEL_IDS = [7, 8, 11, 21, 23, 24, 26, 0, 4]  # road, sidewalk, building, vegetation, sky, person, car, void x2
SYNTHIA_IDS = [3, 4, 2, 6, 1, 10, 8, 0, 13]   # the same classes in SYNTHIA's raw ids (0, 13 -> ignore)


def write_png16(path, array):
    """Write an HxWx3 uint16 array as a 16-bit RGB PNG (what SYNTHIA GT/LABELS are)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                          + chunk(b"IEND", b""))


def run_check(root, *extra):
    """`python common.py check-data --data-root ROOT ...` as a subprocess."""
    return subprocess.run([sys.executable, str(ROOT / "common.py"), "check-data", "--data-root", str(root), *extra],
                          capture_output=True, text=True)


def write_malicious_checkpoint(path, marker):
    """A pickle that would create `marker` if it were unpickled with weights_only=False."""
    code = (f"import torch, os\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'model': E(), 'iteration': 1}}, r'{path}')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def random_ids(rng, h, w, ids):
    return np.asarray(ids, dtype=np.uint8)[rng.integers(0, len(ids), size=(h, w))]


def write_rgb(path, rng, h, w):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)


def write_palette(path, ids):
    im = Image.fromarray(ids, mode="P")
    im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


THING_IDS, STUFF_IDS = (24, 26), (7, 11, 21, 23)   # Cityscapes label ids: person, car / road, building, vegetation, sky


def blocky_labels(rng, h=64, w=128):
    """Left half one thing class, right half two stuff classes (top, bottom): 32-pixel cells are pure (the
    feature distance's thing-class mask is not empty) and crops mixed."""
    ids = np.zeros((h, w), dtype=np.uint8)
    ids[:h // 2], ids[h // 2:] = rng.choice(STUFF_IDS, 2, replace=False)
    ids[:, :w // 2] = rng.choice(THING_IDS)
    return ids


def make_blocky(root, h=64, w=128):
    """GTA5 (4 pairs) and Cityscapes (4 train, 2 val) trees of h x w images with blocky_labels."""
    rng = np.random.default_rng(0)
    for i in range(1, 5):
        write_rgb(root / "gta5" / "images" / f"{i:05d}.png", rng, h, w)
        write_palette(root / "gta5" / "labels" / f"{i:05d}.png", blocky_labels(rng, h, w))
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            city = "aachen" if split == "train" else "frankfurt"
            stem = f"{city}_{i:06d}_000019"
            write_rgb(root / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rng, h, w)
            d = root / "cityscapes" / "gtFine" / split / city
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(blocky_labels(rng, h, w), mode="L").save(d / f"{stem}_gtFine_labelIds.png")
    return root


def same_state(a, b):
    """Two state dicts with the same keys in the same order and equal tensors."""
    return all(torch.equal(a[k], b[k]) for k in a) and list(a) == list(b)


def make_gta5(root, n=4, h=24, w=40, mismatch=True, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(1, n + 1):
        write_rgb(root / "gta5" / "images" / f"{i:05d}.png", rng, h, w)
        lh, lw = (h + 2, w + 4) if (mismatch and i == n) else (h, w)
        write_palette(root / "gta5" / "labels" / f"{i:05d}.png", random_ids(rng, lh, lw, LABEL_IDS))
    return root / "gta5"


def make_synthia(root, n=3, h=38, w=64, seed=1):
    rng = np.random.default_rng(seed)
    (root / "synthia" / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_rgb(root / "synthia" / "RGB" / f"{i:07d}.png", rng, h, w)
        lab = np.zeros((h, w, 3), dtype=np.uint16)
        lab[..., 0] = random_ids(rng, h, w, SYNTHIA_IDS)
        lab[..., 1] = rng.integers(0, 5000, size=(h, w))  # instance ids, > 255 on purpose
        write_png16(root / "synthia" / "GT" / "LABELS" / f"{i:07d}.png", lab)
    return root / "synthia"


def make_cityscapes(root, n_train=6, n_val=2, h=32, w=64, nested=False, seed=2):
    rng = np.random.default_rng(seed)
    base = root / "cityscapes"
    img_root = base / "leftImg8bit_trainvaltest" / "leftImg8bit" if nested else base / "leftImg8bit"
    lab_root = base / "gtFine_trainvaltest" / "gtFine" if nested else base / "gtFine"
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city = ("aachen", "bochum")[i % 2] if split == "train" else "frankfurt"
            stem = f"{city}_{i:06d}_000019"
            write_rgb(img_root / split / city / f"{stem}_leftImg8bit.png", rng, h, w)
            ids = random_ids(rng, h, w, LABEL_IDS)
            d = lab_root / split / city
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids, mode="L").save(d / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(ids * 3, mode="L").save(d / f"{stem}_gtFine_instanceIds.png")
            Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(d / f"{stem}_gtFine_color.png")
            (d / f"{stem}_gtFine_polygons.json").write_text("{}")
    return base


@pytest.fixture
def data_root(tmp_path):
    make_gta5(tmp_path)
    make_synthia(tmp_path)
    make_cityscapes(tmp_path)
    return tmp_path


def script_runner(module, tiny):
    """run(root, out, *flags) -> (metrics, checkpoint) of a method script's main() with tiny settings."""
    def run(root, out, *flags):
        metrics = module.main([*tiny, "--data-root", str(root), "--out-dir", str(out), *map(str, flags)])
        return metrics, torch.load(Path(out) / "checkpoint.pth", weights_only=True)
    return run


def weights_after(run, root, tmp_path_factory, iters=3):
    """get(flags) -> a digest of the student's weights after `iters` iterations with those flags (cached;
    the run folder, ~140 MB of checkpoint, is removed at once)."""
    cache = {}

    def get(flags):
        if tuple(flags) not in cache:
            out = tmp_path_factory.mktemp("flag")
            state = run(root, out, "--iters", iters, *flags)[1]["model"]
            cache[tuple(flags)] = weights_digest(state)
            shutil.rmtree(out)
        return cache[tuple(flags)]
    return get


def weights_digest(state):
    """sha256 over every tensor of a state dict: equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(autouse=True)
def quick_demo_init(monkeypatch):
    """`--init demo` pretrains for 2 iterations in tests (the real recipe takes a minute or two)."""
    import demo
    monkeypatch.setitem(demo.INIT_RECIPE, "iters", 2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """GTA5, SYNTHIA and Cityscapes trees for one test module's method runs (a module may define its own)."""
    r = tmp_path_factory.mktemp("data")
    make_gta5(r)
    make_synthia(r)
    make_cityscapes(r)
    return r
