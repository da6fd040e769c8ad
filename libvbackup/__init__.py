"""libvbackup: push/pull backups of running libvirt/QEMU domains into qcow2 chains.

Layers, from the bottom up (each module imports only from the ones above it in this list;
tests/unit/test_layers.py holds the code to it):

- ``errors``      the one exception hierarchy (and the package logger's NullHandler)
- ``results``     what a backup job returns (pull, push, prune, run, progress): frozen dataclasses, ``to_dict``
                  for --json (pure)
- ``outcomes``    what the other operations return (pure)
- ``domxml``      reading a domain's XML: which disks can be backed up (pure)
- ``domdef``      a new domain definition from the XML saved with a point (pure)
- ``netexport``   where a pull export listens when not on this host: address, ports, TLS
- ``xmlgen``      <domainbackup>/<domaincheckpoint> documents from xml_templates/ (pure)
- ``extents``     NBD extent merging and copy planning (pure)
- ``records``     sparse digest records as a stream of raw bytes (pure)
- ``checksum``    block digests of guest data (pure; xxhash loads only when digests are made)
- ``sums``        how a point stores its digests: sparse records, the blkhash (pure)
- ``seal``        what leaves the host for a bucket: frames sealed with AES-256-GCM (pure)
- ``manifest``    the repository's on-disk format (pure parse/serialise)
- ``retention``   which points a prune keeps: borg's last/daily/weekly/monthly/yearly rules (pure)
- ``plan``        which checkpoint a backup extends, its level, names; prune plans (pure)
- ``config``      the configuration file: defaults and per-VM policies for ``run`` (pure, but for reading it)
- ``checkpoints`` libvirt's checkpoints seen from the repository: usable, redefinable, whose
- ``documents``   the XML documents of a plan (pure)
- ``qcow2``       where each cluster of a new qcow2 image goes, and its metadata (pure)
- ``qcow2map``    reading any qcow2 image: its header, its own layer's map (pure)
- ``lock``        the per-VM lock, never unlinked; its holder proven by the kernel
- ``progress``    progress lines and counters
- ``signals``     SIGINT/SIGTERM around a run, the umask
- ``preload``     imports made in a thread while a libvirt call waits (the copy's modules during backupBegin)
- ``nbdio``       the only module that imports ``nbd``: ``Source``, the one source interface
- ``bucket``      the only module that imports ``boto3``: S3 objects, errors in one line
- ``imagefile``   a qcow2 image's own layer read from its file (``qemu-img map`` + pread)
- ``offsite``     a repository in a bucket: header, point objects, ranged reads, uploads
- ``remotesource`` a point's chain read from a bucket: a source for the copy engine
- ``engine``      the copy engine: a source into a target, an observer watching
- ``parallel``    several copies at once, a watchdog, the first failure stops all
- ``virt``        the only module that imports ``libvirt``
- ``target``      the image files the engine writes (raw, and qcow2 through ``qcow2``)
- ``qemuimg``     qemu-img wrappers
- ``repo``        the repository: every path convention, the lock, sums, commit of a point
- ``instantrec``  instant VMs seen from the repository: their records, the points they read, their qemu-nbd
- ``quiesce``     guest file systems frozen through the agent while the job begins; the thaw guard
- ``journal``     the run journal: states, clean-up and recovery of a dead run
- ``scratch``     the run directory and the scratch guard
- ``transport``   what the pull and push transports share
- ``pull``, ``push``, ``offline``   the transports (``offline``: a shut-off domain's images)
- ``backup``, ``restore``, ``verify``, ``prune``, ``lifecycle``   operations
- ``s3repo``      ``copy`` to a bucket; list, restore, verify, prune of a bucket
- ``vmrestore``   a VM back from a point: defined anew, or its disks put back in place
- ``instant``     a VM running at once on overlays of a point served over NBD (``--instant``), ``finalize``
- ``mapping``     one disk of a point served read-only over NBD (``map``)
- ``guestfiles``  single files of a point: listed, copied out (the only module that imports ``guestfs``)
- ``runner``      ``libvbackup run``: every VM a policy names, a few at once, one report
- ``api``         the Python API: every operation, keyword arguments, typed results
- ``cli``         typer commands, thin
"""

__version__ = "0.1.0"

# The package logger's NullHandler is attached in ``errors``, which every module that logs
# imports: the command line's client (``cli.resident``) starts without logging's 30 ms.
