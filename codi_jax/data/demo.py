"""``codi_demo``: an offline TFDS dataset cut from natural images that ship with scikit-image and
scikit-learn, so the embedded run and the tests need no download.

Each source image is split by columns: the right-most ``eval_fraction`` is held out. Training crops
come only from the left part and eval crops only from the held-out part, so no eval pixel is ever
seen in training (the ``x``/``y`` features record every crop's origin in its source image).
The motorcycle stereo image ships with its disparity map (inverse depth, invalid pixels = inf): it is
the one real depth pair, also exposed alone as the ``train_depth`` / ``eval_depth`` splits.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from codi_jax.data import tensorflow_setup  # noqa: F401 — TensorFlow's GPUs hidden before any use


def _sklearn_image(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


# (name, loader, caption). Natural photographs and textures only: synthetic test charts would teach
# the model nothing useful.
SOURCE_IMAGES: tuple[tuple[str, Callable[[], np.ndarray], str], ...] = (
    ("astronaut", _skimage("astronaut"), "a portrait of an astronaut in a spacesuit in front of a flag"),
    ("camera", _skimage("camera"), "a black and white photo of a photographer with a camera on a tripod"),
    ("coffee", _skimage("coffee"), "a cup of coffee on a saucer"),
    ("chelsea", _skimage("chelsea"), "a tabby cat"),
    ("rocket", _skimage("rocket"), "a rocket on a launch pad"),
    ("hubble_deep_field", _skimage("hubble_deep_field"), "galaxies in the deep sky"),
    ("retina", _skimage("retina"), "a photo of a human retina"),
    ("immunohistochemistry", _skimage("immunohistochemistry"), "a microscope image of stained tissue"),
    ("brick", _skimage("brick"), "a brick wall"),
    ("grass", _skimage("grass"), "a patch of grass"),
    ("gravel", _skimage("gravel"), "gravel on the ground"),
    ("coins", _skimage("coins"), "old coins on a table"),
    ("moon", _skimage("moon"), "the surface of the moon"),
    ("china", _sklearn_image("china.jpg"), "a chinese temple among trees"),
    ("flower", _sklearn_image("flower.jpg"), "a pink flower"),
)
DEPTH_IMAGE = "motorcycle"
DEPTH_CAPTION = "a motorcycle in a workshop"


@dataclasses.dataclass
class CodiDemoConfig(tfds.core.BuilderConfig):
    crop_size: int = 32
    train_crops_per_image: int = 128
    eval_crops_per_image: int = 8
    eval_fraction: float = 0.25
    depth_crop_multiplier: int = 8


def demo_config(
    crop_size: int = 32,
    train_crops_per_image: int = 128,
    eval_crops_per_image: int = 8,
    eval_fraction: float = 0.25,
    depth_crop_multiplier: int = 8,
) -> CodiDemoConfig:
    """The builder config for these options; its name encodes them, so each gets its own folder."""
    name = f"s{crop_size}_t{train_crops_per_image}_e{eval_crops_per_image}_h{round(eval_fraction * 100)}_d{depth_crop_multiplier}"
    return CodiDemoConfig(
        name=name,
        description=f"{crop_size}x{crop_size} crops",
        crop_size=crop_size,
        train_crops_per_image=train_crops_per_image,
        eval_crops_per_image=eval_crops_per_image,
        eval_fraction=eval_fraction,
        depth_crop_multiplier=depth_crop_multiplier,
    )


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


class CodiDemo(tfds.core.GeneratorBasedBuilder):
    """Random crops of images shipped inside scikit-image / scikit-learn, with a held-out split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [demo_config()]
    # Nothing is downloaded. Setting this also skips TFDS's search for a checksums file next to the
    # builder's code, which needs `importlib_resources` (absent from some installs).
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.crop_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3)),
                    # Empty (0, 0, 1) for images without a depth map.
                    "depth": tfds.features.Tensor(shape=(None, None, 1), dtype=np.float32, encoding="zlib"),
                    "has_depth": np.bool_,
                    "text": tfds.features.Text(),
                    "source": tfds.features.Text(),
                    "y": np.int32,
                    "x": np.int32,
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # everything ships with installed packages
        return {
            "train": self._generate_examples(held_out=False, depth_only=False),
            "eval": self._generate_examples(held_out=True, depth_only=False),
            "train_depth": self._generate_examples(held_out=False, depth_only=True),
            "eval_depth": self._generate_examples(held_out=True, depth_only=True),
        }

    def _sources(self, depth_only: bool) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, str]]:
        if not depth_only:
            for name, load, caption in SOURCE_IMAGES:
                yield name, _rgb(load()), None, caption
        import skimage.data

        left, _, disparity = skimage.data.stereo_motorcycle()
        yield DEPTH_IMAGE, _rgb(left), disparity.astype(np.float32)[..., None], DEPTH_CAPTION

    def _generate_examples(self, held_out: bool, depth_only: bool) -> Iterator[tuple[str, dict]]:
        c = self.builder_config
        s = c.crop_size
        for name, image, depth, caption in self._sources(depth_only):
            h, w = image.shape[:2]
            split_col = int(w * (1.0 - c.eval_fraction))
            x_lo, x_hi = (split_col, w - s) if held_out else (0, split_col - s)
            if x_hi < x_lo or h < s:
                continue  # region too small for this crop size
            n = c.eval_crops_per_image if held_out else c.train_crops_per_image
            if depth_only:
                n *= c.depth_crop_multiplier
            # Seeded by name and split: the same crops on every machine and every build.
            rng = np.random.default_rng([zlib.crc32(name.encode()), int(held_out), s])
            ys = rng.integers(0, h - s + 1, size=n)
            xs = rng.integers(x_lo, x_hi + 1, size=n)
            for i, (y, x) in enumerate(zip(ys, xs)):
                d = depth[y : y + s, x : x + s] if depth is not None else np.zeros((0, 0, 1), np.float32)
                yield f"{name}_{i}", {
                    "image": image[y : y + s, x : x + s],
                    "depth": d,
                    "has_depth": depth is not None,
                    "text": caption,
                    "source": name,
                    "y": int(y),
                    "x": int(x),
                }


def default_demo_dir() -> str:
    """Where the demo is built when the config names no data dir (never the user's TFDS_DATA_DIR)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "codi_jax", "tensorflow_datasets")


def build_demo(config: CodiDemoConfig, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The prepared demo builder (built on first use: seconds, offline), stored as array_record so
    examples can be read by index."""
    # TFDS refuses a config object named like a predefined one: refer to those by name.
    known = {c.name for c in CodiDemo.BUILDER_CONFIGS}
    builder = CodiDemo(
        config=config.name if config.name in known else config,
        data_dir=data_dir or default_demo_dir(),
        file_format="array_record",
    )
    builder.download_and_prepare()
    return builder
