"""One replay of a slot plan, as the executor runs it, for packed ticks (with or without a weight lane).

Each device keeps a dict ``slot -> (micro-batch, stage)`` per buffer
(activations, gradient inbox, W inputs). Per tick: the arrivals (what the
neighbours' lanes sent at the tick before) and the W inputs of the device's
own B of the tick before are written first; then the forward, backward and
weight lanes read. A write must go to a free slot below the slot count, a
read must find its own entry, and a slot the plan names where nothing is
written or read (it must be -1 there) fails too.
"""

from __future__ import annotations

import numpy as np


def _lane(microbatch, op_is, stage):
    """``(micro-batch [T, P], stage [T, P])`` of one lane, -1 where it is empty."""
    return np.where(op_is, microbatch, -1), np.where(op_is, stage, -1)


def replay_ticks(ticks, buffers):
    """Replays ``ticks.tick_buffers``' plan on packed ticks (a weight lane if split); returns the peak held."""
    slots = {name: getattr(buffers, name) for name in (
        "num_act_slots", "recv_act_slot", "forward_slot", "backward_slot", "num_grad_slots", "recv_grad_slot",
        "grad_slot", "weight_act_slot", "num_weight_slots", "weight_out_slot", "weight_slot")}
    lanes = [(ticks.forward, ticks.stage(ticks.forward_chunk)), (ticks.backward, ticks.stage(ticks.backward_chunk))]
    if ticks.split:
        lanes.append((ticks.weight, ticks.stage(ticks.weight_chunk)))
    return replay_slots(lanes, ticks.num_stages, ticks.num_microbatches, slots, stash_first_stage=True)


def _write(store, slot, num, entry, where):
    assert 0 <= slot < num and slot not in store, f"{where}: writing {entry} to slot {slot} of {num}, held: {store}"
    store[slot] = entry


def replay_slots(lanes, S, M, slots, stash_first_stage):
    """Runs a slot plan tick by tick and checks every write and read.

    Args:
      lanes: ``(forward, backward)`` or ``(forward, backward, weight)``
        pairs ``(micro-batch [T, P], stage [T, P])``, -1 where a lane is
        empty. With a weight lane, B keeps the activation slot and W frees it.
      S: stages; stage ``s`` lives on device ``s % P``.
      M: micro-batches: every (m, s) must run each lane once.
      slots: the plan's fields by ``TickBuffers``' names (the weight ones
        only with a weight lane).
      stash_first_stage: whether stage 0's forward stashes its input.

    Returns:
      ``[P]`` most activation entries held at once per device.
    """
    (fwd, f_stage), (bwd, b_stage) = lanes[:2]
    split = len(lanes) == 3
    T, P = fwd.shape
    acts, grads, weights = ([{} for _ in range(P)] for _ in range(3))
    peak = np.zeros(P, int)
    ran = [set() for _ in lanes]
    for t in range(T):
        for p in range(P):
            where = f"tick {t}, device {p}"
            q, r = (p - 1) % P, (p + 1) % P
            sent_act = t > 0 and 0 <= f_stage[t - 1, q] < S - 1
            act = (int(fwd[t - 1, q]), int(f_stage[t - 1, q]) + 1) if sent_act else None
            grad = (int(bwd[t - 1, r]), int(b_stage[t - 1, r]) - 1) if t > 0 and b_stage[t - 1, r] > 0 else None
            for store, recv, num, entry in ((acts, "recv_act_slot", "num_act_slots", act),
                                            (grads, "recv_grad_slot", "num_grad_slots", grad)):
                if entry is None:
                    assert slots[recv][t, p] == -1, f"{where}: {recv} set but nothing arrives"
                else:
                    _write(store[p], slots[recv][t, p], slots[num], entry, f"{where} arrival")
            if split and t > 0 and bwd[t - 1, p] >= 0:  # B's W inputs, written at the start of the next tick
                entry = (int(bwd[t - 1, p]), int(b_stage[t - 1, p]))
                _write(weights[p], slots["weight_out_slot"][t - 1, p], slots["num_weight_slots"], entry, where)
        for p in range(P):
            where = f"tick {t}, device {p}"
            if fwd[t, p] >= 0:
                key = (int(fwd[t, p]), int(f_stage[t, p]))
                ran[0].add(key)
                slot = slots["forward_slot"][t, p]
                if key[1] == 0 and stash_first_stage:
                    _write(acts[p], slot, slots["num_act_slots"], key, f"{where} forward")
                if key[1] > 0 or stash_first_stage:
                    assert acts[p].get(slot) == key, f"{where}: forward {key} reads slot {slot} holding {acts[p]}"
                else:
                    assert slot == -1, f"{where}: forward of stage 0 given activation slot {slot}"
            else:
                assert slots["forward_slot"][t, p] == -1, f"{where}: forward_slot set on an empty lane"
            peak[p] = max(peak[p], len(acts[p]))
            if bwd[t, p] >= 0:
                key = (int(bwd[t, p]), int(b_stage[t, p]))
                ran[1].add(key)
                slot = slots["backward_slot"][t, p]
                if key[1] > 0 or stash_first_stage:
                    held = acts[p].get(slot) if split else acts[p].pop(slot, None)
                    assert held == key, f"{where}: backward {key} reads slot {slot} holding {held}"
                else:
                    assert slot == -1, f"{where}: backward of stage 0 given activation slot {slot}"
                if key[1] < S - 1:
                    held = grads[p].pop(slots["grad_slot"][t, p], None)
                    assert held == key, f"{where}: backward {key} reads gradient {held}"
                else:
                    assert slots["grad_slot"][t, p] == -1, f"{where}: the last stage is given a gradient slot"
            else:
                assert slots["backward_slot"][t, p] == -1 and slots["grad_slot"][t, p] == -1, where
                assert not split or slots["weight_out_slot"][t, p] == -1, where
            if split and lanes[2][0][t, p] >= 0:
                key = (int(lanes[2][0][t, p]), int(lanes[2][1][t, p]))
                ran[2].add(key)
                held = weights[p].pop(slots["weight_slot"][t, p], None)
                assert held == key, f"{where}: W {key} reads W inputs {held}"
                held = acts[p].pop(slots["weight_act_slot"][t, p], None)
                assert held == key, f"{where}: W {key} reads activations {held}"
            elif split:
                assert slots["weight_slot"][t, p] == -1 and slots["weight_act_slot"][t, p] == -1, where
    assert all(not store for store in acts + grads + weights), "entries left after the last tick"
    everything = {(m, s) for m in range(M) for s in range(S)}
    assert all(keys == everything for keys in ran), "a lane missed or repeated a (micro-batch, stage)"
    return peak
