"""OCI/Docker layer changesets (tars) in and out of layer directories.

Import walks the tar's members itself (never `extractall`): every name is checked and made
relative to a directory fd, one component at a time with O_NOFOLLOW, so a hostile tar cannot
write outside the layer, through a symlink it planted, or link to a file outside. The layer is
built in a temporary sibling directory and renamed into place whole: an error leaves nothing.
OCI whiteouts become the kernel format (char device 0/0, `overlay.opaque=y`) unless asked to
stay OCI.

Export is the reverse for an upper directory written by cowfs or the kernel: it walks the upper,
which holds only the changes, so its cost is that of the changes and not of the image. Renamed
directories (`overlay.redirect`) and metadata-only copies (`overlay.metacopy`) reach into the
lower layers for their content, which therefore must be given.
"""

import contextlib
import dataclasses
import decimal
import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from typing import BinaryIO

from cowfs import _at, layers, lookup, whiteout

log = logging.getLogger(__name__)

WHITEOUT_FORMATS = ("kernel", "oci")
_CHUNK_BYTES = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK_BYTES)
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# aufs's own bookkeeping names (`.wh..wh.plnk`, ...): not content, skipped as docker does.
_AUFS_META_PREFIX = ".wh..wh."
_SCHILY_XATTR = "SCHILY.xattr."
_LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."

Path = tuple[str, ...]


class LayerError(Exception):
    """A layer that cannot be imported or exported; the message is one line for the user."""


@dataclasses.dataclass
class LayerDigests:
    """What was read: `sha256:` digests and sizes of the blob as stored and as a plain tar."""

    blob_digest: str
    blob_bytes: int
    diff_id: str
    tar_bytes: int


class DigestReader(io.RawIOBase):
    """Passes a stream through, hashing and counting what is read."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "bytearray | memoryview") -> int:  # type: ignore[override]
        data = self.source.read(len(buffer))
        size = len(data)
        buffer[:size] = data
        self.hash.update(data)
        self.count += size
        return size

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def open_decompressed(source: io.BufferedReader) -> BinaryIO:
    """The plain tar inside *source*: gzip and zstd are recognised by their magic bytes."""
    magic = source.peek(4)[:4]
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[return-value]
    if magic == _ZSTD_MAGIC:
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[return-value]
            source, read_across_frames=True)
    return source   # type: ignore[return-value]


# -- import ---------------------------------------------------------------------------------


def import_layer(source: str | BinaryIO, target: str, *, whiteouts: str = "kernel",
                 xattr_prefix: str | None = None,
                 verify: Callable[[LayerDigests], None] | None = None) -> LayerDigests:
    """Apply the layer tar *source* (a path or a binary stream) as the new directory *target*.

    *target* must not exist or be an empty directory. *verify* sees the digests after the last
    byte was read and before the layer is renamed into place; raising there leaves nothing.
    """
    if whiteouts not in WHITEOUT_FORMATS:
        raise LayerError(f"unknown whiteout format {whiteouts!r}: expected kernel or oci")
    _check_import_target(target)
    with contextlib.ExitStack() as resources:
        if isinstance(source, str):
            try:
                source = resources.enter_context(open(source, "rb"))
            except OSError as exc:
                raise LayerError(f"cannot open layer {source}: {exc.strerror}") from None
        blob = DigestReader(source)
        buffered = io.BufferedReader(blob, _CHUNK_BYTES)
        tar_stream = DigestReader(open_decompressed(buffered))
        staging = _make_staging(target)
        try:
            extractor = _Extractor(staging, whiteouts=whiteouts,
                                   marks=whiteout.Marks(xattr_prefix
                                                        or whiteout.default_xattr_prefix()))
            try:
                extractor.extract_all(tar_stream)
            finally:
                extractor.close()
            digests = LayerDigests(blob.digest, blob.count, tar_stream.digest, tar_stream.count)
            if verify is not None:
                verify(digests)
            _rename_into_place(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("imported layer %s into %s", digests.diff_id, target)
    return digests


def _check_import_target(target: str) -> None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            raise LayerError(f"the parent of {target} does not exist") from None
        return
    if not stat.S_ISDIR(st.st_mode):
        raise LayerError(f"{target} exists and is not a directory")
    if os.listdir(target):
        raise LayerError(f"{target} is not empty: a layer is imported into a new directory")


def _make_staging(target: str) -> str:
    parent, name = os.path.split(os.path.abspath(target))
    return tempfile.mkdtemp(prefix=f".{name}.cowfs-import-", dir=parent)


def _rename_into_place(staging: str, target: str) -> None:
    try:
        os.rename(staging, target)   # replaces an empty directory, never a non-empty one
    except OSError as exc:
        raise LayerError(f"cannot move the layer into {target}: {exc.strerror}") from None


def split_member_name(name: str, what: str = "name") -> Path:
    """A tar name as path components below the layer root; escapes are refused.

    `./a//b/` is ("a", "b"); `.` is the root (). Absolute names and `..` are never accepted,
    also where they would stay inside (`a/../b`): a layer has no reason to write them.
    """
    if name.startswith("/"):
        raise LayerError(f"refused {what} {name!r}: absolute path")
    components = tuple(part for part in name.split("/") if part not in ("", "."))
    for part in components:
        if part == "..":
            raise LayerError(f"refused {what} {name!r}: '..' leaves the layer")
        if "\0" in part or len(os.fsencode(part)) > _at.NAME_MAX:
            raise LayerError(f"refused {what} {name!r}: invalid name")
    return components


def _time_ns(member: tarfile.TarInfo, key: str) -> int:
    """A PAX time at full precision, else the header's seconds."""
    text = member.pax_headers.get(key)
    if text is not None:
        try:
            return int(decimal.Decimal(text).scaleb(9))
        except decimal.InvalidOperation:
            pass
    return int(member.mtime) * 1_000_000_000


def member_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """The xattrs a tar member carries (SCHILY and libarchive PAX records)."""
    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith(_SCHILY_XATTR):
            found[key[len(_SCHILY_XATTR):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith(_LIBARCHIVE_XATTR):
            import base64
            name = urllib.parse.unquote(key[len(_LIBARCHIVE_XATTR):])
            found[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return found


class _Extractor:
    """The members of one tar, applied below one root directory fd."""

    def __init__(self, root: str, *, whiteouts: str, marks: whiteout.Marks) -> None:
        self.root = root
        self.root_fd = os.open(root, _at.DIR_PATH_FLAGS)
        self.convert_whiteouts = whiteouts == "kernel"
        self.marks = marks
        self.directories: dict[Path, int] = {(): self.root_fd}   # O_PATH fds by path
        self.directory_metadata: dict[Path, tarfile.TarInfo] = {}
        self.extracted: set[Path] = set()    # non-directories a hard link may name
        self.root_metadata: tarfile.TarInfo | None = None

    def close(self) -> None:
        for fd in self.directories.values():
            os.close(fd)
        self.directories.clear()

    def extract_all(self, stream: BinaryIO) -> None:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    self.extract(archive, member)
            while stream.read(_CHUNK_BYTES):
                pass             # the digest covers the tar's trailing padding too
        except (tarfile.TarError, EOFError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise LayerError(f"cannot read the layer: {exc.strerror or exc}") from None
            raise LayerError(f"not a valid layer tar: {exc}") from None
        for path in sorted(self.directory_metadata, key=len, reverse=True):
            # Deepest first, after every child exists: making a child changes a dir's mtime.
            parent_fd = self.directories.get(path[:-1])
            if parent_fd is not None:
                self.apply_metadata(parent_fd, path[-1], self.directory_metadata[path])
        if self.root_metadata is not None:
            self.apply_metadata(self.root_fd, None, self.root_metadata)
        else:
            os.chmod(self.root, 0o755)

    def extract(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        path = split_member_name(member.name)
        try:
            if not path:
                if not member.isdir():
                    raise LayerError(f"refused {member.name!r}: the root must be a directory")
                self.root_metadata = member
                return
            parent_fd = self.parent_fd(path, create=True, shown=member.name)
            name = path[-1]
            if self.is_whiteout_member(member, path, parent_fd):
                return
            self.make_entry(archive, member, parent_fd, path)
        except OSError as exc:
            raise LayerError(f"cannot extract {member.name!r}: {exc.strerror or exc}") from None
        if not member.isdir() and not member.islnk():
            self.apply_metadata(parent_fd, name, member)

    def is_whiteout_member(self, member: tarfile.TarInfo, path: Path, parent_fd: int) -> bool:
        """Turn an OCI whiteout into the kernel's; True when *member* was one."""
        name = path[-1]
        if not whiteout.is_oci_name(name) or not self.convert_whiteouts:
            return False
        if name == whiteout.OCI_OPAQUE_MARKER:
            self.marks.set_opaque(parent_fd, None)
            return True
        if name.startswith(_AUFS_META_PREFIX):
            return True
        hidden = name[len(whiteout.OCI_WHITEOUT_PREFIX):]
        if not hidden:
            raise LayerError(f"refused {member.name!r}: a whiteout of no name")
        self.remove_existing(parent_fd, (*path[:-1], hidden), keep_directory=False)
        whiteout.make_whiteout(parent_fd, hidden)
        return True

    def parent_fd(self, path: Path, *, create: bool, shown: str) -> int:
        """The directory fd holding path[-1]; directories a tar leaves out are made (0755)."""
        fd = self.root_fd
        for depth in range(1, len(path)):
            prefix = path[:depth]
            cached = self.directories.get(prefix)
            if cached is not None:
                fd = cached
                continue
            name = prefix[-1]
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = self.make_implicit_directory(fd, prefix, create=create, shown=shown)
            if stat.S_ISLNK(st.st_mode):
                raise LayerError(f"refused {shown!r}: the path goes through the symlink "
                                 f"{'/'.join(prefix)}")
            if not stat.S_ISDIR(st.st_mode):
                raise LayerError(f"refused {shown!r}: {'/'.join(prefix)} is not a directory")
            fd = self.directories[prefix] = os.open(name, _at.DIR_PATH_FLAGS, dir_fd=fd)
        return fd

    def make_implicit_directory(self, parent_fd: int, path: Path, *, create: bool,
                                shown: str) -> os.stat_result:
        if not create:
            raise LayerError(f"refused {shown!r}: {'/'.join(path)} is not in the layer (yet)")
        if self.convert_whiteouts and whiteout.is_oci_name(path[-1]):
            raise LayerError(f"refused {shown!r}: a whiteout name as a directory")
        os.mkdir(path[-1], 0o755, dir_fd=parent_fd)
        return os.stat(path[-1], dir_fd=parent_fd, follow_symlinks=False)

    def remove_existing(self, parent_fd: int, path: Path, *, keep_directory: bool) -> bool:
        """Make room for a later member of the same name (in a tar, the last one wins).

        Returns True when an existing directory stays (a directory member over a directory).
        """
        name = path[-1]
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        self.extracted -= {key for key in self.extracted if key[:len(path)] == path}
        if stat.S_ISDIR(st.st_mode):
            if keep_directory:
                return True
            for cached in [key for key in self.directories if key[:len(path)] == path]:
                os.close(self.directories.pop(cached))
            for described in [key for key in self.directory_metadata
                              if key[:len(path)] == path]:
                del self.directory_metadata[described]
            shutil.rmtree(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)
        return False

    def make_entry(self, archive: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int,
                   path: Path) -> None:
        name = path[-1]
        if member.islnk():
            self.make_hard_link(member, parent_fd, path)
            return
        kept = self.remove_existing(parent_fd, path, keep_directory=member.isdir())
        mode = stat.S_IMODE(member.mode)
        if member.isdir():
            if not kept:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            self.directory_metadata[path] = member
            return
        if member.isreg():
            self.write_file(archive, member, parent_fd, name)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=parent_fd)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(name, kind | mode, os.makedev(member.devmajor, member.devminor),
                     dir_fd=parent_fd)
        elif member.isfifo():
            os.mkfifo(name, mode, dir_fd=parent_fd)
        else:
            raise LayerError(f"refused {member.name!r}: unsupported member type "
                             f"{member.type!r}")
        self.extracted.add(path)

    def make_hard_link(self, member: tarfile.TarInfo, parent_fd: int, path: Path) -> None:
        source = split_member_name(member.linkname, "hard link target")
        if source not in self.extracted:
            raise LayerError(f"refused hard link {member.name!r} -> {member.linkname!r}: "
                             f"the target is not an earlier file of this layer")
        if source == path:
            raise LayerError(f"refused hard link {member.name!r}: it names itself")
        source_parent_fd = self.parent_fd(source, create=False, shown=member.linkname)
        self.remove_existing(parent_fd, path, keep_directory=False)
        os.link(source[-1], path[-1], src_dir_fd=source_parent_fd, dst_dir_fd=parent_fd,
                follow_symlinks=False)
        self.extracted.add(path)

    def write_file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int,
                   name: str) -> None:
        """The data, with runs of zeros left as holes (layers are often full of them)."""
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent_fd)
        with os.fdopen(fd, "wb") as output:
            data = archive.extractfile(member)
            assert data is not None
            while chunk := data.read(_CHUNK_BYTES):
                if len(chunk) == _CHUNK_BYTES and chunk == _ZERO_CHUNK:
                    output.seek(len(chunk), os.SEEK_CUR)
                else:
                    output.write(chunk)
            output.truncate(member.size)

    def apply_metadata(self, parent_fd: int, name: str | None, member: tarfile.TarInfo) -> None:
        """Owner, xattrs, mode, times, in that order: chown clears setuid bits and
        capabilities, and every step changes ctime."""
        target = _at.fd_path(parent_fd, name)
        follow = name is None
        try:
            os.chown(target, member.uid, member.gid, follow_symlinks=follow)
            for attribute, value in sorted(member_xattrs(member).items()):
                # A user's own overlay xattr is stored escaped, as the kernel does; the tar
                # cannot plant overlay's private markers.
                os.setxattr(target, whiteout.stored_xattr_name(attribute), value,
                            follow_symlinks=follow)
            if not member.issym():
                os.chmod(target, stat.S_IMODE(member.mode), follow_symlinks=follow)
            mtime_ns = _time_ns(member, "mtime")
            atime_ns = _time_ns(member, "atime") if "atime" in member.pax_headers else mtime_ns
            os.utime(target, ns=(atime_ns, mtime_ns), follow_symlinks=follow)
        except OSError as exc:
            raise LayerError(f"cannot set the metadata of {member.name!r}: "
                             f"{exc.strerror or exc}") from None


# -- export ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportSummary:
    entries: int = 0          # tar members written, whiteouts and opaque markers included
    data_bytes: int = 0       # file data written


def compression_for(path: str) -> str | None:
    """`gzip` or `zstd` by the file name's ending, None for a plain tar."""
    if path.endswith((".gz", ".tgz")):
        return "gzip"
    if path.endswith((".zst", ".zstd")):
        return "zstd"
    return None


def export_layer(upper: str, output: str, *, lowers: list[str] | None = None,
                 userxattr: bool = False, compression: str | None = None) -> ExportSummary:
    """Write the changes held in *upper* as an OCI layer tar at *output*, made whole or not
    at all. *lowers* (top first) are needed only for renamed directories and metadata-only
    copies; *userxattr* reads overlay's markers under `user.overlay.` instead of `trusted.`."""
    try:
        upper_fd = os.open(upper, _at.DIR_PATH_FLAGS)
    except OSError as exc:
        raise LayerError(f"cannot open upper layer {upper}: {exc.strerror}") from None
    parent, name = os.path.split(os.path.abspath(output))
    try:
        handle, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    except OSError as exc:
        os.close(upper_fd)
        raise LayerError(f"cannot write {output}: {exc.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as raw, _compressed(raw, compression) as stream, \
                _Exporter(upper, upper_fd, stream, lowers, userxattr) as exporter:
            exporter.export_directory(upper_fd, ())
            summary = exporter.summary
        os.chmod(partial, 0o644)
        os.rename(partial, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    finally:
        os.close(upper_fd)
    log.info("exported %s as %s (%d entries)", upper, output, summary.entries)
    return summary


@contextlib.contextmanager
def _compressed(raw: BinaryIO, compression: str | None) -> Iterator[BinaryIO]:
    if compression is None:
        yield raw
    elif compression == "gzip":
        # mtime 0 and no file name: the same changes give the same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as stream:
            yield stream  # type: ignore[misc]
    elif compression == "zstd":
        import zstandard
        with zstandard.ZstdCompressor().stream_writer(raw, closefd=False) as stream:
            yield stream  # type: ignore[misc]
    else:
        raise LayerError(f"unknown compression {compression!r}: expected gzip or zstd")


def _tar_name(path: Path) -> str:
    return "/".join(path)


def _set_times(info: tarfile.TarInfo, st: os.stat_result) -> None:
    """Seconds in the header; nanoseconds, when there are any, in a PAX record."""
    info.mtime = st.st_mtime_ns // 1_000_000_000
    if st.st_mtime_ns % 1_000_000_000:
        info.pax_headers["mtime"] = format(decimal.Decimal(st.st_mtime_ns).scaleb(-9), "f")


class _Exporter:
    """Writes tar members for an upper's entries, in sorted order."""

    def __init__(self, upper: str, upper_fd: int, stream: BinaryIO, lowers: list[str] | None,
                 userxattr: bool) -> None:
        self.upper, self.upper_fd, self.lowers = upper, upper_fd, lowers
        self.prefix = whiteout.OVERLAY_XATTR_PREFIXES[1 if userxattr else 0]
        # Not the "w|" stream mode: its buffer would be flushed at garbage collection, into a
        # closed file, after a failure.
        self.archive = tarfile.open(  # noqa: SIM115 (closed by __exit__, only on success)
            fileobj=stream, mode="w", format=tarfile.PAX_FORMAT)
        self.links: dict[tuple[int, int], str] = {}   # (st_dev, st_ino) -> first tar name
        self.summary = ExportSummary()
        self._merged: _MergedTree | None = None

    def __enter__(self) -> "_Exporter":
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if self._merged is not None:
            self._merged.close()
        if kind is None:
            self.archive.close()

    def marker(self, fd: int, name: str | None, key: str) -> bytes | None:
        return _at.get_xattr(fd, name, self.prefix + key)

    def merged(self, why: str) -> "_MergedTree":
        if self.lowers is None:
            raise LayerError(f"{why}: its content is in the lower layers; give them with "
                             f"--lowers L1:L2")
        if self._merged is None:
            self._merged = _MergedTree(self.upper, self.lowers)
        return self._merged

    def is_whiteout(self, directory_fd: int, name: str, st: os.stat_result) -> bool:
        return whiteout.is_device_whiteout(st) or (
            stat.S_ISREG(st.st_mode) and st.st_size == 0
            and self.marker(directory_fd, name, whiteout.WHITEOUT) is not None)

    def export_directory(self, directory_fd: int, path: Path) -> None:
        """The directory's entries, sorted by the names they get in the tar."""
        entries = []
        for name in _sorted_names(directory_fd):
            _check_exportable((*path, name))
            st = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
            shown = whiteout.oci_whiteout_name(name) if self.is_whiteout(directory_fd, name, st) \
                else name
            entries.append((os.fsencode(shown), shown, name, st))
        for _, shown, name, st in sorted(entries):
            child = (*path, name)
            if shown != name:
                self.add_marker((*path, shown), st)
            elif stat.S_ISDIR(st.st_mode):
                self.export_subdirectory(directory_fd, name, st, child)
            elif (stat.S_ISREG(st.st_mode)
                  and self.marker(directory_fd, name, whiteout.METACOPY) is not None):
                _, _, data_fd = self.merged(
                    f"{_tar_name(child)} holds metadata only").open_file(child)
                try:
                    self.add_entry(child, directory_fd, name, st, data_fd=data_fd)
                finally:
                    os.close(data_fd)
            else:
                self.add_entry(child, directory_fd, name, st)

    def export_subdirectory(self, parent_fd: int, name: str, st: os.stat_result,
                            path: Path) -> None:
        fd = os.open(name, _at.DIR_PATH_FLAGS, dir_fd=parent_fd)
        try:
            opaque = self.marker(fd, None, whiteout.OPAQUE) == b"y"
            # As the kernel: an opaque directory's redirect means nothing.
            redirected = not opaque and self.marker(fd, None, whiteout.REDIRECT) is not None
            self.add_entry(path, parent_fd, name, st)
            if opaque or redirected:
                # A renamed directory is written whole at its new name, over whatever the
                # lowers hold there: opaque, so nothing below shows through.
                self.add_marker((*path, whiteout.OCI_OPAQUE_MARKER), st)
            if redirected:
                merged = self.merged(f"{_tar_name(path)} is a renamed directory")
                merged.export_whole(self, path)
            else:
                self.export_directory(fd, path)
        finally:
            os.close(fd)

    def add_marker(self, path: Path, st: os.stat_result) -> None:
        """An OCI whiteout or opaque marker: an empty file, timed as the change it stands for."""
        info = tarfile.TarInfo(_tar_name(path))
        info.mode = 0o644
        info.uname = info.gname = ""
        _set_times(info, st)
        self.archive.addfile(info)
        self.summary.entries += 1

    def add_entry(self, path: Path, directory_fd: int, name: str | None, st: os.stat_result,
                  data_fd: int | None = None) -> None:
        """One member with its owner, mode, times and visible xattrs; a hard link to the first
        name of a file already written."""
        info = tarfile.TarInfo(_tar_name(path))
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        _set_times(info, st)
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in self.links:
            info.type, info.linkname = tarfile.LNKTYPE, self.links[key]
            self.archive.addfile(info)
            self.summary.entries += 1
            return
        for attribute, value in _visible_xattrs(directory_fd, name).items():
            info.pax_headers[_SCHILY_XATTR + attribute] = value.decode("utf-8",
                                                                       "surrogateescape")
        if stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            if st.st_nlink > 1:
                self.links[key] = info.name
            self.add_file(info, directory_fd, name, data_fd)
            return
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            assert name is not None
            info.linkname = os.readlink(name, dir_fd=directory_fd)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
        else:
            raise LayerError(f"cannot export {info.name}: a socket has no place in a layer")
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            self.links[key] = info.name
        self.archive.addfile(info)
        self.summary.entries += 1

    def add_file(self, info: tarfile.TarInfo, directory_fd: int, name: str | None,
                 data_fd: int | None) -> None:
        fd = data_fd
        if fd is None:
            assert name is not None
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory_fd)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(fd), "rb") as data:
                self.archive.addfile(info, data)
        finally:
            if data_fd is None:
                os.close(fd)
        self.summary.entries += 1
        self.summary.data_bytes += info.size


def _check_exportable(path: Path) -> None:
    """Refuse an upper's `.wh.` name (made outside cowfs, e.g. under the kernel's overlay).

    A layer tar has no way to say "a file of this name": every reader takes it for a whiteout
    or opaque marker, so exporting it would turn the user's file into a deletion.
    """
    if whiteout.is_oci_name(path[-1]):
        raise LayerError(f"cannot export {_tar_name(path)}: a layer tar would read this "
                         f"name as a whiteout; rename or remove it in the upper")


def _sorted_names(directory_fd: int) -> list[str]:
    listing_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory_fd)
    try:
        return sorted(os.listdir(listing_fd), key=os.fsencode)
    finally:
        os.close(listing_fd)


def _visible_xattrs(directory_fd: int, name: str | None) -> dict[str, bytes]:
    """The xattrs a user sees, sorted: overlay's private ones left out, escaped ones shown."""
    found: dict[str, bytes] = {}
    for stored in sorted(_at.list_xattrs(directory_fd, name)):
        visible = whiteout.visible_xattr_name(stored)
        if visible is None:
            continue
        value = _at.get_xattr(directory_fd, name, stored)
        if value is not None:
            found[visible] = value
    return found


class _MergedTree:
    """The upper over its lowers, read as the merged view (cowfs's own lookup): where renamed
    directories and metadata-only copies find their content."""

    def __init__(self, upper: str, lowers: list[str]) -> None:
        try:
            self.stack = layers.open_stack([upper, *lowers])
        except layers.LayoutError as exc:
            raise LayerError(str(exc)) from None
        self.fds = lookup.DirectoryFds(self.stack)
        self.root = lookup.make_root(self.stack)

    def close(self) -> None:
        self.fds.close_all()
        self.stack.close()

    def resolve(self, path: Path) -> "lookup.Entry":
        entry = self.root
        for depth, name in enumerate(path):
            try:
                found = lookup.lookup(self.fds, entry, name, upper=0) \
                    if isinstance(entry, lookup.Directory) else None
            except lookup.BrokenEntry as exc:
                raise LayerError(f"{_tar_name(path[:depth + 1])} cannot be read: {exc.strerror} "
                                 f"(a metadata-only copy finds its data in the lower layers "
                                 f"given with --lowers)") from None
            if found is None:
                raise LayerError(f"{_tar_name(path[:depth + 1])} is not in the merged view")
            entry = found
        return entry

    def open_file(self, path: Path) -> tuple[int, str, int]:
        """(directory fd, name, data fd) of a metadata-only copy, its data from the lowers."""
        entry = self.resolve(path)
        directory_fd, name = entry.location(self.fds)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        data_fd = lookup.open_data(self.fds, entry, flags) if entry.metacopy \
            else os.open(name, flags, dir_fd=directory_fd)
        return directory_fd, name, data_fd

    def export_whole(self, exporter: _Exporter, path: Path) -> None:
        """Every entry the merged view shows below *path*, written in full."""
        directory = self.resolve(path)
        assert isinstance(directory, lookup.Directory)
        names = sorted(lookup.read_merged_names(self.fds, directory, upper=0), key=os.fsencode)
        for name in names:
            _check_exportable((*path, name))
            entry = lookup.lookup(self.fds, directory, name, upper=0)
            if entry is None:
                continue
            child = (*path, name)
            if isinstance(entry, lookup.Directory):
                fd = self.fds.fd(entry, entry.layer)
                exporter.add_entry(child, fd, None, os.fstat(fd))
                self.export_whole(exporter, child)
            elif stat.S_ISREG(entry.stat.st_mode):
                directory_fd, entry_name, data_fd = self.open_file(child)
                try:
                    exporter.add_entry(child, directory_fd, entry_name, entry.stat,
                                       data_fd=data_fd)
                finally:
                    os.close(data_fd)
            else:
                directory_fd, entry_name = entry.location(self.fds)
                exporter.add_entry(child, directory_fd, entry_name, entry.stat)
