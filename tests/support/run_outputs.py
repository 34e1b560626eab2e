"""Reading what a run wrote: its --metrics-file, TensorBoard tags, an offline W&B run."""

import json
from pathlib import Path


def read_metrics(path):
    """(training records, validation records) of a --metrics-file."""
    lines = [json.loads(line) for line in open(path)]
    return ([r for r in lines if "lm_loss" in r], [r for r in lines if "val_loss" in r])


def tensorboard_tags(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def wandb_history(directory):
    """{step: {key: value}} of the offline W&B run under ``directory``, decoded with wandb's own
    record schema from its .wandb file (leveldb-style log: 32 KiB blocks of chunks with a
    7-byte header: CRC, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(directory).rglob("*.wandb")
    data, pos, pending, history = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                history.setdefault(record.history.step.num, {}).update(items)
    return history


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-30)
