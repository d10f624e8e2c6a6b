"""An ImageFolder that reads each image once and says which file is wrong.

torchvision's ``ImageFolder`` follows directory symlinks into cycles (``train/c3/loop -> ..``
gave 9,020 samples out of 220, exit 0) and fails with a traceback on a dangling or
self-referencing link, an empty file or an image PIL cannot decode.  :class:`CheckedImageFolder`
walks the class folders itself: it follows a symlinked folder once, refuses a link back into a
folder it is inside (a loop) or to a folder already read (images counted twice), and refuses
broken links and zero-byte images while listing; an image that cannot be decoded fails when
it is first read, naming the file.  Each refusal is a :class:`~slimcore.errors.DataError`.

Hidden files and folders (a name starting with ``.``: ``.ipynb_checkpoints/``, ``.DS_Store``,
``._img.png``) are neither classes nor images, as in a file manager.  Images with more than 8 bits
per value (16-bit PNG/TIFF grayscale) are scaled from their full range (0..65535) to 8 bits,
never clipped at 255; 32-bit float images are read when their values lie in [0, 1].  An image
whose header claims more pixels than PIL's decompression-bomb limit is refused, naming the file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from slimcore.errors import DataError


def _broken_link(path: str) -> DataError | None:
    """The error for a symlink that leads nowhere (missing target, or a loop of links), else None."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return DataError(f"data.root: {path} is a symlink to {os.readlink(path)!r}, which does not exist: "
                         "fix or remove the link")
    except OSError as err:
        if err.errno == errno.ELOOP:
            return DataError(f"data.root: {path} is a symlink that leads back to itself (a loop of links): "
                             "fix or remove the link")
        return DataError(f"data.root: {path}: cannot read it ({(err.strerror or str(err)).lower()})")
    return None


def list_images(folder: str, extensions: tuple[str, ...] = IMG_EXTENSIONS,
                seen: dict[str, str] | None = None) -> list[str]:
    """Image files under ``folder`` (sorted, recursive), following each symlinked folder once.

    Raises :class:`DataError` for a folder link that loops back or reaches a folder twice, a
    broken link, or a zero-byte image.  ``seen`` (real path -> the path it was first read
    through) is shared between the calls for one split's classes: no folder counts for two.
    """
    found: list[str] = []
    seen = {} if seen is None else seen

    def walk(path: str, inside: str | None) -> None:
        real = os.path.realpath(path)
        if inside is not None and os.path.commonpath([real, inside]) == real:  # a link up the tree
            raise DataError(f"data.root: {path} is a symlink to {real}, a folder that contains it: a loop "
                            "(its images would repeat without end); remove the link")
        if real in seen:
            raise DataError(f"data.root: {path} leads to {real}, already read as {seen[real]}: its images "
                            "would count twice; remove one of the two")
        seen[real] = path
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith("."):  # hidden: .ipynb_checkpoints/, .DS_Store, ._img.png
                continue
            if entry.is_symlink():
                broken = _broken_link(entry.path)
                if broken is not None:
                    raise broken
            if entry.is_dir():  # follows a (working) symlink
                walk(entry.path, real)
            elif has_file_allowed_extension(entry.name, extensions):
                if entry.stat().st_size == 0:
                    raise DataError(f"data.root: {entry.path} is empty (0 bytes): replace or remove it")
                found.append(entry.path)

    walk(folder, os.path.realpath(os.path.dirname(os.path.abspath(folder))))
    return found


_WIDE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def _to_rgb(image: Any, path: str) -> Any:
    """``image`` as 8-bit RGB; a 16-bit (or 32-bit integer / float) one scaled from its full range."""
    if image.mode not in _WIDE:
        return image.convert("RGB")
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    top = _WIDE[image.mode]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= top):
        kind = "32-bit float" if image.mode == "F" else f"{image.mode} integer"
        raise DataError(f"data.root: {path}: a {kind} image with values {low:g}..{high:g}, outside "
                        f"0..{top:g}: save it as an 8- or 16-bit image")
    scaled = np.rint(values * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")


def load_image(path: str) -> Any:
    """The image at ``path`` as RGB, or a :class:`DataError` naming the file.

    16-bit images are scaled from 0..65535 (not clipped at 255: two 16-bit images of 1,000 and
    30,000 differ as 4 and 117 do); an image over PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``,
    a decompression bomb) is refused before it is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return _to_rgb(image, path)
    except Image.DecompressionBombError as err:
        why = " ".join(str(err).split()).rstrip(".")
        raise DataError(f"data.root: {path}: {why}: replace it with a smaller image or remove it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        reason = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else \
            f"{type(err).__name__}: {' '.join(str(err).split())}"
        raise DataError(f"data.root: {path}: corrupt or unreadable image ({reason}): replace or remove it") from None


class CheckedImageFolder(datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` listed by :func:`list_images` and read by :func:`load_image`."""

    def __init__(self, root: str | Path, transform: Any = None) -> None:
        super().__init__(str(root), transform=transform, loader=load_image)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Class folders of ``directory``, sorted; hidden ones (``.ipynb_checkpoints``) are not classes."""
        with os.scandir(directory) as it:
            classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"found no class folder in {directory} (hidden folders do not count)")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: str | Path, class_to_idx: dict[str, int],  # type: ignore[override]
                     extensions: tuple[str, ...] | None = None, is_valid_file: Any = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        samples = []
        seen: dict[str, str] = {}
        for name in sorted(class_to_idx):
            samples += [(path, class_to_idx[name]) for path in
                        list_images(os.path.join(str(directory), name), extensions or IMG_EXTENSIONS, seen)]
        present = {target for _, target in samples}
        empty = sorted(name for name, idx in class_to_idx.items() if idx not in present)
        if empty and not allow_empty:
            raise FileNotFoundError(f"found no image ({', '.join(extensions or IMG_EXTENSIONS)}) in class "
                                    f"folder(s) {', '.join(empty[:5])}")
        return samples


__all__ = ["CheckedImageFolder", "list_images", "load_image"]
