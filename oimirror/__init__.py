"""An Open Images mirror for tests and offline runs: the real file layout on local disk, served
on 127.0.0.1.

    layout    the folders, paths and headers both sources use, and the shared writers
    generate  synthetic, learnable images of any Open Images classes, with faults baked in
    folders   real photos from a class-per-folder set, byte for byte
    serve     the HTTP server, with injectable faults (errors, truncation, hangs, latency)
    cli       `python -m oimirror generate|serve`
"""

from oimirror.folders import generate_from_folders
from oimirror.generate import DEFAULT_CLASSES, EXIF_ORIENTATION_TAG, generate
from oimirror.layout import (
    IMAGE_ID_HEADER,
    IMAGES_DIR,
    LABEL_HEADER,
    MANIFEST,
    METADATA_DIR,
    SPLITS,
)
from oimirror.serve import MirrorServer
from oipipe.data.openimages import IMAGE_ID_FILES, LABEL_FILES

__all__ = [
    "DEFAULT_CLASSES",
    "EXIF_ORIENTATION_TAG",
    "IMAGES_DIR",
    "IMAGE_ID_FILES",
    "IMAGE_ID_HEADER",
    "LABEL_FILES",
    "LABEL_HEADER",
    "MANIFEST",
    "METADATA_DIR",
    "SPLITS",
    "MirrorServer",
    "generate",
    "generate_from_folders",
]
