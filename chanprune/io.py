"""Saving and loading (pruned) models as plain data: architecture config plus weights.

A chanprune model file holds ``{"arch_config": model.arch_config(), "state_dict": ...}``
(the format of :func:`chanprune.models.save_model`): a JSON-like dict describing the
architecture (pruned widths included) and CPU tensors. It loads with
``torch.load(path, weights_only=True)``; no pickled code is written or executed, and the model
is rebuilt by :func:`chanprune.models.build_model`.

Files are written atomically (a temporary file in the destination folder, then a rename), so
a reader never sees a half-written file and a failed save leaves neither a temporary file nor
a damaged previous file behind.

Examples
--------
>>> import chanprune.io
>>> from chanprune.models import vgg_digits
>>> chanprune.io.save(vgg_digits(), "digits.pt")  # doctest: +SKIP
>>> model = chanprune.io.load("digits.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .models import save_model
from .models._checkpoint import (
    cpu_state_dict,
    first_line,
    load_weights,
    normalize_state_dict,
    read_checkpoint,
)
from .models._registry import build_model, model_from_checkpoint
from .models.vgg import vgg_config_of
from .surgery import apply_shapes, module_shapes

__all__ = ["save", "load", "atomic_write", "atomic_write_all", "write_all_creating_folders"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def _as_path(path: object, name: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"The {name!r} parameter must be a str or os.PathLike; got {type(path).__name__}."
        )
    return Path(path)


def _check_destination(path: Path) -> None:
    """Raise if ``path`` cannot be a file destination (a folder, or its folder is missing)."""
    if path.is_dir():
        raise IsADirectoryError(f"Cannot write to '{path}': it is a directory; pass a file path.")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"Cannot write to '{path}': the folder '{parent}' does not exist.")


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """``exc`` if it is an ``OSError``, else the ``OSError`` it was raised from or while
    handling, if any: torch's zip writer reports a full disk as a ``RuntimeError`` raised
    while handling the ``OSError`` of the failed write."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _write_error(error: OSError, path: Path) -> OSError:
    """``error`` restated for the destination ``path``: the temporary file it may name means
    nothing to the caller. The errno, hence the ``OSError`` subclass, is kept."""
    if error.errno is None:
        return OSError(f"could not write '{path}': {error}")
    return OSError(error.errno, error.strerror or os.strerror(error.errno), str(path))


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Create or replace ``path`` atomically with what ``write`` writes.

    ``write(tmp)`` is called with a temporary file in the folder of ``path`` (already created,
    empty); once it returns, the file gets the usual permissions (``0o666`` minus the umask)
    and is renamed over ``path`` with :func:`os.replace`. If ``write`` or the rename fails,
    the temporary file is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file. Its folder must exist.
    write : callable
        ``write(tmp_path: pathlib.Path) -> None``; should write the whole content to
        ``tmp_path``.

    Raises
    ------
    IsADirectoryError
        If ``path`` is a directory.
    FileNotFoundError
        If the folder of ``path`` does not exist.
    OSError
        If writing or renaming fails (a full disk, an I/O error), also when ``write``
        raised another exception while handling an ``OSError``: the error names ``path``
        (``filename``), not the temporary file, and keeps the ``errno``.
    """
    atomic_write_all([(path, write)])


def atomic_write_all(outputs: Sequence[tuple[PathLike, Callable[[Path], None]]]) -> None:
    """Write several files all or nothing, as far as the file system allows.

    Every ``write(tmp)`` first writes its own temporary file beside its destination; only
    when all of them have succeeded are the temporary files renamed over the destinations
    (:func:`os.replace`, atomic per file). If any write fails, every temporary file is
    removed and no destination is touched.

    Parameters
    ----------
    outputs : sequence of (path, write)
        Destination files (their folders must exist) and the callables that write them,
        as in :func:`atomic_write`.

    Raises
    ------
    IsADirectoryError
        If a destination is a directory.
    FileNotFoundError
        If the folder of a destination does not exist.
    ValueError
        If two outputs name the same file.
    OSError
        If writing or renaming fails, as in :func:`atomic_write`; it names the destination
        that failed.
    """
    items = [(_as_path(path), write) for path, write in outputs]
    resolved = [p.resolve() for p, _ in items]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"Two outputs name the same file: {[str(p) for p, _ in items]}.")
    for p, _ in items:
        _check_destination(p)
    umask = os.umask(0)  # mkstemp creates 0600 files; give them ordinary permissions
    os.umask(umask)
    staged: list[tuple[Path, Path]] = []
    target: Optional[Path] = None  # the destination being written when something fails
    try:
        for p, write in items:
            target = p
            fd, tmp_name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
            os.close(fd)
            staged.append((Path(tmp_name), p))
            write(Path(tmp_name))
            os.chmod(tmp_name, 0o666 & ~umask)
        for tmp, p in staged:
            target = p
            os.replace(tmp, p)
    except BaseException as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        error = _os_error_in(exc) if isinstance(exc, Exception) else None
        if error is not None and target is not None:
            raise _write_error(error, target) from exc
        raise


def write_all_creating_folders(outputs: Sequence[tuple[PathLike, Callable[[Path], None]]]) -> None:
    """Create the missing folders of ``outputs``, then write them all or nothing
    (:func:`atomic_write_all`); on failure, remove the folders created here and re-raise."""
    created: list[Path] = []
    try:
        for path, _ in outputs:
            missing = []
            folder = Path(path).parent
            while not folder.exists():
                missing.append(folder)
                folder = folder.parent
            for folder in reversed(missing):
                folder.mkdir()
                created.append(folder)
        atomic_write_all(outputs)
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def save(model: nn.Module, path: PathLike) -> None:
    """Save a chanprune model (pruned or not) to ``path``, atomically.

    The file holds ``{"arch_config": model.arch_config(), "state_dict": ...}`` with CPU
    tensors, as written by :func:`chanprune.models.save_model`; it loads with
    ``torch.load(path, weights_only=True)`` and :func:`load` rebuilds the model from it.

    Parameters
    ----------
    model : nn.Module
        A model built by :mod:`chanprune.models` (it has ``arch_config()``), for example the
        output of :func:`chanprune.prune.prune_model` on such a model. Not modified.
    path : str or os.PathLike
        Destination file (conventionally ``*.pt``); overwritten if present. Its folder must
        exist.

    Notes
    -----
    A model of any other class (one the graph planner pruned) is saved as its layers'
    shapes (:func:`chanprune.surgery.module_shapes`) with its ``state_dict``, also
    ``weights_only``-loadable: its class cannot be rebuilt from data, so
    ``load(path, model=YourModel())`` shrinks a fresh instance to those shapes.

    Raises
    ------
    IsADirectoryError
        If ``path`` is a directory.
    FileNotFoundError
        If the folder of ``path`` does not exist.
    OSError
        If writing fails (a full disk, an I/O error); the error names ``path``, as in
        :func:`atomic_write`.

    Examples
    --------
    >>> from chanprune.models import vgg_digits
    >>> save(vgg_digits(), "digits.pt")  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"The 'model' parameter must be an nn.Module; got {type(model).__name__}.")
    config = None
    p = _as_path(path)
    if callable(getattr(model, "arch_config", None)):
        config = model.arch_config()
        with torch.device("meta"):  # shapes only: nothing allocated or initialised
            rebuilt = module_shapes(build_model(config))
        shapes = module_shapes(model)
        if rebuilt != shapes:
            # Pruned beyond what its config describes (a layer the planner narrowed that
            # the architecture has no width for): the config and the layers' shapes.
            _check_destination(p)
            payload = {"arch_config": config, "module_shapes": shapes,
                       "state_dict": cpu_state_dict(model)}  # fmt: skip
            atomic_write(p, lambda tmp: torch.save(payload, tmp))
            return
    else:
        # A VGG-structured module from elsewhere (torchvision): infer its architecture.
        try:
            config = vgg_config_of(model)
        except TypeError:
            # Any other class: its layers' shapes, to shrink a fresh instance on load.
            _check_destination(p)
            payload = {
                "module_shapes": module_shapes(model),
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "state_dict": cpu_state_dict(model),
            }  # fmt: skip
            atomic_write(p, lambda tmp: torch.save(payload, tmp))
            return
    _check_destination(p)
    save_model(model, p, config=config)  # atomic: temporary file, then os.replace


def load(
    path: PathLike, *, model: Optional[nn.Module] = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a model written by :func:`save`: rebuild its architecture, load weights strictly.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save` (or :func:`chanprune.models.save_model`). It is read
        with ``torch.load(weights_only=True)`` and never modified.
    model : nn.Module, optional
        For a file of layer shapes (a network of your own class, pruned by the graph
        planner): a fresh instance of that class, shrunk in place to the saved shapes and
        filled with the saved weights. Not used for chanprune's own architectures, which
        the file rebuilds.
    map_location : str or torch.device, default="cpu"
        Device the returned model is moved to.

    Returns
    -------
    model : nn.Module
        The rebuilt model (pruned widths included), in eval mode, on ``map_location``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (the message names it).
    ValueError
        If the file is corrupt, is not a chanprune model file (for example a bare
        state_dict: use ``chanprune.models.get_model(name, weights=path)``; or pickled
        Python objects, such as a model saved whole with ``torch.save(model, path)``), or
        its weights do not match its architecture; the message names the file. Also if
        ``map_location`` is not a device, or one not available here (such as ``"cuda"``
        with a torch built without CUDA).

    Examples
    --------
    >>> model = load("digits.pt")  # doctest: +SKIP
    >>> model.training  # doctest: +SKIP
    False
    """
    p = _as_path(path)
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"The 'map_location' parameter must be a device such as 'cpu' or 'cuda:0'; "
            f"got {map_location!r}."
        ) from exc
    try:
        # Before reading the file: a torch built without CUDA says so with a bare
        # AssertionError, and a missing device index only once the model is moved.
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError) as exc:
        raise ValueError(
            f"The 'map_location' parameter names device {str(device)!r}, which is not "
            f"available here: {first_line(exc)}"
        ) from exc
    try:
        obj = read_checkpoint(p)
        shapes_only = isinstance(obj, dict) and "module_shapes" in obj
        if shapes_only and model is None and "arch_config" in obj:
            # A chanprune architecture pruned beyond its config: rebuilt, then reshaped.
            model = _load_shapes(p, obj, build_model(obj["arch_config"]))
        elif model is not None or shapes_only:
            model = _load_shapes(p, obj, model)
        else:
            model = model_from_checkpoint(obj, p)
    except FileNotFoundError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, ValueError) and str(p) in str(exc):
            raise  # already names the file
        raise ValueError(f"'{p}' is not a valid chanprune model file: {exc}") from exc
    logger.debug("Loaded %s from '%s'.", type(model).__name__, p)
    return model.to(device).eval()


def _load_shapes(path: Path, obj, model: Optional[nn.Module]) -> nn.Module:
    """A shapes file (contents ``obj``) into ``model``: shrink it to the saved shapes, then
    load the weights strictly."""
    if not isinstance(obj, dict) or "module_shapes" not in obj:
        raise ValueError(
            f"'{path}' holds an architecture chanprune rebuilds itself; call load(path) "
            "without model=."
        )
    if model is None:
        raise ValueError(
            f"'{path}' holds a pruned {obj.get('model_class', 'network')} as layer shapes: "
            "build a fresh instance of that class and pass it, load(path, model=...)."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}.")
    apply_shapes(model, obj["module_shapes"])
    state_dict = normalize_state_dict(obj, source=f"Checkpoint '{path}'")
    return load_weights(model, state_dict, name=type(model).__name__)
