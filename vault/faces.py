"""Faces at the edge: photos become embeddings on the caller's machine, so that no image
ever reaches the vault (optional extra ``faces``: dlib's ResNet model from the dlib-bin and
face_recognition_models wheels, offline once installed).

The same file is ``vault_client.faces`` in the client package (a symlink): it needs numpy
and dlib only. ``vault embed IMAGE... --out FILE.npz`` writes what ``vault import`` reads.
The embeddings are dlib's 128-d face descriptors (the model behind ``tests/data``'s LFW
figures); the vault normalises them, so their scale does not matter.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

DIMENSION = 128
INSTALL = "pip install 'vault-client[faces]' (or the server's extra: pip install '.[faces]')"


class FaceError(ValueError):
    """An image that gives no single face, or a missing model: the message says which."""


def _models() -> Path:
    # The package's __init__ needs pkg_resources, gone from recent setuptools: find its
    # model files without running it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceError(f"the face models are not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceEmbedder:
    """Detects the one face of a photo and computes its 128-d descriptor. ``upsample``:
    how many times the detector enlarges the image (finds smaller faces, slower);
    ``jitter``: re-samples averaged per descriptor (steadier, slower)."""

    def __init__(self, upsample: int = 1, jitter: int = 0) -> None:
        try:
            import dlib
        except ImportError:
            raise FaceError(f"dlib is not installed: {INSTALL}") from None
        models = _models()
        self._dlib: Any = dlib
        self._detect = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._model = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.upsample, self.jitter = upsample, jitter

    def embed_image(self, image: np.ndarray, name: str = "the image") -> np.ndarray:
        """The descriptor of the single face in an RGB image (H, W, 3) of uint8."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        faces = self._detect(image, self.upsample)
        if len(faces) == 0:
            raise FaceError(f"{name}: no face found (a frontal face, at least about 80 pixels "
                            "wide)")
        if len(faces) > 1:
            raise FaceError(f"{name}: {len(faces)} faces; crop it to the one to enroll")
        shape = self._shape(image, faces[0])
        return np.asarray(self._model.compute_face_descriptor(image, shape, self.jitter),
                          dtype=np.float32)

    def embed_file(self, path: str | Path) -> np.ndarray:
        """The descriptor of the single face in an image file (JPEG, PNG...)."""
        try:
            image = self._dlib.load_rgb_image(str(path))
        except RuntimeError:
            raise FaceError(f"{path}: cannot read it as an image") from None
        return self.embed_image(image, str(path))


def embed_files(paths: Iterable[str | Path], embedder: FaceEmbedder | None = None
                ) -> tuple[np.ndarray, list[Path], dict[Path, str]]:
    """(embeddings (n, 128), the files they came from, {file: why it gave none})."""
    embedder = embedder or FaceEmbedder()
    rows, done, failed = [], [], {}
    for path in map(Path, paths):
        try:
            rows.append(embedder.embed_file(path))
            done.append(path)
        except FaceError as exc:
            failed[path] = str(exc)
    return (np.stack(rows) if rows else np.zeros((0, DIMENSION), np.float32)), done, failed
