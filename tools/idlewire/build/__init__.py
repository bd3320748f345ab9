"""The image build pipeline: rootfs → bake → assemble → artifacts, each stage a function."""
