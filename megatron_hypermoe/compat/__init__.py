"""Every patch of megatron-core and every touch of DeepSpeed's private API, in one place, each
written against one pinned version, refusing any other, and tested."""
