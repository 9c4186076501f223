from qemu_instances.cli import main

main()
