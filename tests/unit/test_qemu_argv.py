from types import SimpleNamespace

from fleetbisect.targets.qemu import VMPaths, accel_args, qemu_argv


def make(accel="tcg", root=None, qemu_args=(), has_agent=False, port=10022):
    guest = SimpleNamespace(address="127.0.0.1", port=port, has_agent=has_agent)
    target = SimpleNamespace(qemu="qemu-system-x86_64", machine="q35", accel=accel, guest=guest)
    boot = SimpleNamespace(memory=512, cpus=2, cmdline="console=ttyS0 panic=-1", root=root,
                           qemu_args=list(qemu_args))
    return target, boot


def test_argv_is_a_list_of_words_with_direct_kernel_boot():
    target, boot = make()
    paths = VMPaths.under("/var/tmp/fb work")
    argv = qemu_argv(target, boot, kernel="/b/k; rm -rf /", initrd="/b/i", paths=paths)
    assert argv[0] == "qemu-system-x86_64"
    # Data stays one word each, whatever it contains: nothing is for a shell to interpret.
    assert argv[argv.index("-kernel") + 1] == "/b/k; rm -rf /"
    assert argv[argv.index("-initrd") + 1] == "/b/i"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 panic=-1"
    assert argv[argv.index("-serial") + 1] == "file:/var/tmp/fb work/vm/console.log"
    assert argv[argv.index("-pidfile") + 1] == "/var/tmp/fb work/vm/qemu.pid"
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:10022-:22" in argv
    assert argv[argv.index("-m") + 1] == "512" and argv[argv.index("-smp") + 1] == "2"
    assert "-daemonize" in argv and "-no-reboot" in argv


def test_optional_parts():
    target, boot = make(root="/img/root.raw", qemu_args=["-cpu", "max"])
    argv = qemu_argv(target, boot, kernel="k", initrd=None, paths=VMPaths("/w/vm"))
    assert "-initrd" not in argv
    assert "file=/img/root.raw,if=virtio,format=raw,snapshot=on" in argv
    assert argv[-5:-3] == ["-cpu", "max"]


def test_the_guest_agent_channel_only_when_asked():
    target, boot = make()
    assert not any("virtserialport" in a or "qga" in a for a in qemu_argv(target, boot, kernel="k", initrd=None,
                                                                          paths=VMPaths("/w/vm")))
    target, boot = make(has_agent=True, port=None, qemu_args=["-cpu", "max"])
    argv = qemu_argv(target, boot, kernel="k", initrd=None, paths=VMPaths("/w,x/vm"))
    # QEMU's option syntax: a comma in a value is written twice, or it starts a new option.
    assert argv[argv.index("-chardev") + 1] == "socket,path=/w,,x/vm/qga.sock,server=on,wait=off,id=qga0"
    assert argv[argv.index("virtio-serial-pci") - 1] == "-device"
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in argv
    assert "user,id=n0" in argv  # no port: nothing forwarded, the guest still has its network
    assert argv[-5:-3] == ["-cpu", "max"]  # the playbook's own arguments still come last


def test_accel():
    assert accel_args("tcg") == ["-accel", "tcg"]
    assert accel_args("kvm")[:2] == ["-accel", "kvm"]
    assert accel_args("auto") == ["-accel", "kvm", "-accel", "tcg"]
