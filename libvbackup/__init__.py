"""libvbackup: push/pull backups of running libvirt/QEMU domains into qcow2 chains.

Layers, from the bottom up (each module imports only from the ones above it in this list):

- ``errors``      the one exception hierarchy
- ``domxml``      reading a domain's XML: which disks can be backed up (pure)
- ``xmlgen``      <domainbackup>/<domaincheckpoint> documents from xml_templates/ (pure)
- ``extents``     NBD extent merging and copy planning (pure)
- ``plan``        which checkpoint a backup extends, its level, names (pure)
- ``manifest``    the repository's on-disk format (pure parse/serialise)
- ``checksum``    block digests of guest data (pure)
- ``qcow2``       where each cluster of a new qcow2 image goes, and its metadata (pure)
- ``nbdio``       the only module that imports ``nbd``: the copy engine
- ``virt``        the only module that imports ``libvirt``
- ``target``      the image files the engine writes (raw, and qcow2 through ``qcow2``)
- ``qemuimg``     qemu-img wrappers
- ``repo``        the repository: paths, lock, atomic manifest writes
- ``backup``, ``restore``, ``verify``, ``prune``, ``lifecycle``   operations
- ``cli``         typer commands, thin
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
