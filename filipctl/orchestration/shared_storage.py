"""Whether every node a run reaches can see a folder: a run folder on one machine's own disk is a job that fails
(or, worse, resumes from nothing) on the others. Decided before anything is queued.

A folder counts as shared when it is object storage (s3://...), lies under one of `cluster.shared_dirs` (what the
site declares: its cluster file system), or sits on a network file system by its mount type (NFS, Lustre, GPFS,
BeeGFS, CephFS, ...). Anything else (ext4, xfs, tmpfs, overlay: this machine's own disks) is node-local.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from filipctl.errors import CannotRun
from filipctl.schema import Recipe

# Mount types every node of a cluster sees the same (from /proc/self/mountinfo's file system type field).
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "fuse.ceph-fuse", "glusterfs", "fuse.glusterfs",
    "cifs", "smb3", "smbfs", "panfs", "wekafs", "fuse.weka", "afs", "orangefs", "pvfs2", "quobyte", "fuse.quobyte",
    "fuse.sshfs", "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse", "fuse.mountpoint-s3", "fuse.goofys", "fuse.rclone",
    "vastfs",
})


@dataclass(frozen=True)
class Mount:
    point: Path
    fstype: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts(mountinfo: str) -> list[Mount]:
    """The mounts listed in the text of /proc/self/mountinfo."""
    found = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if sep and len(fields) >= 5 and tail.split():
            found.append(Mount(Path(_unescape(fields[4])), tail.split()[0]))
    return found


def mount_of(path: Path, table: list[Mount]) -> Mount | None:
    """The mount that holds `path`: the deepest mount point above it (the last one mounted wins on a tie)."""
    best: Mount | None = None
    for m in table:
        if path == m.point or m.point in path.parents:
            if best is None or len(m.point.parts) >= len(best.point.parts):
                best = m
    return best


def node_local(location: str, shared_dirs: list[str], table: list[Mount]) -> str | None:
    """None when every node sees `location`, else what it is ("this machine's ext4 file system (mounted at /)")."""
    if "://" in location and not location.startswith("file://"):
        return None  # object storage (s3://, gs://...): the same from everywhere
    # Symlinks resolved (a link into the cluster file system is on it); what does not exist yet stays as written.
    path = Path(location.removeprefix("file://")).expanduser().resolve()
    for shared in shared_dirs:
        base = Path(shared).expanduser().resolve()
        if path == base or base in path.parents:
            return None
    mount = mount_of(path, table)
    if mount is not None and mount.fstype in NETWORK_FILE_SYSTEMS:
        return None
    if mount is None:
        return "a file system this machine does not list"
    return f"this machine's {mount.fstype} file system (mounted at {mount.point})"


def nodes_reached(recipe: Recipe) -> str | None:
    """What runs the stages on other machines than this one under the recipe's cluster profile, or None when they
    all run here (local; a private Ray of this machine). Slurm jobs run on compute nodes, never on the login node,
    and one stage's node need not be the next one's; on a Ray cluster Ray places the drivers and workers."""
    cluster = recipe.cluster
    if cluster.backend == "slurm":
        return f"Slurm compute nodes, {cluster.slurm.nodes} per pretraining job"
    ray = cluster.ray
    if cluster.backend == "ray" and ray.address != "local":
        return f"the Ray cluster at {ray.address}, whose nodes run the stages and place its workers"
    return None


def check_shared_storage(recipe: Recipe, checkpoint_dirs: list[Path], mountinfo: str | None = None) -> None:
    """Refuse a run on other machines whose output_dir, checkpoint folders, data or Ray storage is on this
    machine's own disk."""
    spread = nodes_reached(recipe)
    if spread is None:
        return
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return  # not Linux: nothing to tell a local disk by; the site's own checks apply
    table = mounts(mountinfo)
    places = [("output_dir", recipe.output_dir)] + [("the checkpoint folder", str(d)) for d in checkpoint_dirs]
    # The data the jobs read (and the data stage writes, for the synthetic set) is read on the nodes too.
    places += [("data.train", source.url) for source in recipe.data.train]
    if recipe.data.eval:
        places.append(("data.eval", recipe.data.eval))
    if recipe.cluster.backend == "ray":
        places.append(("cluster.ray.storage_path", recipe.cluster.ray.storage_path))
    for what, location in places:
        why = node_local(location, recipe.cluster.shared_dirs, table)
        if why:
            raise CannotRun(
                f"{what} {location} is on {why}, which the machines this run reaches ({spread}) cannot see; put it "
                "on the cluster file system (or s3:// for Ray storage), or list the folder in cluster.shared_dirs "
                "if every node mounts it")
