"""Take a push-mode backup of a running VM: QEMU writes the backup images itself.

Same points, chains and options as pull: the images land in the same repository (an
incremental image's backing file is its parent's image, pull or push alike). libvbackup
creates each target image beforehand so that it keeps that backing file, waits for the job
with progress, then moves the images into the repository. A failed or cancelled push leaves
no point and no partial image.

Examples:

\b
  libvbackup push vm1 --repo /backups --scratch-dir /backups/.staging
  libvbackup push vm1 --repo /backups --level inc --progress plain
"""

from .pull import backup_command

push = backup_command("push", __doc__)
