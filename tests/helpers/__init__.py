"""Code the tests share (no tests here): import as `from helpers import qemu` or
`from helpers.procs import mounted`.  pytest puts tests/ on sys.path (rootdir
conftest, no tests/__init__.py), which is what makes `helpers` importable.

- procs: the CLI as a subprocess, mounts and daemons (mounted, unmount, pid_alive...)
- cli: how a refused command must look to a user (one `qcowfuse:` line)
- qemu: QEMU as the referee (qemu-img, qemu-io, qemu-nbd)
- rawqcow2: a minimal qcow2 reader / poker that shares no code with the engine
- workload: random writes through a mounted raw file, mirrored in a model
- powercut: the power-cut harness (recording layer, crash images, their judging)
- checking: `qcowfuse check` against `qemu-img check`, and vmd's damage
- ext4: loop devices and ext4 on them, judged on QEMU's reading
- resize: a guest model for resize tests (Model), qemu-img info
- services: qcowfuse as systemd / mount(8) / users run it (installed program,
  sd_notify socket, mount table and image holders, cleanup)
"""
