"""Grouped convolutions whose groups misalign across a concatenated shortcut (ShuffleNet's trunk).

Every group of a grouped conv must keep as many channels; when a shortcut is
concatenated in front of the next grouped conv, the blocks of one conv cut
across those of the other. The selection must still find the largest
balanced choice: the test enumerates every subset of channels (2^20) with
numpy and compares the count, then checks the pruned model computes what the
original does with the pruned channels zeroed at their source.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from tests.passes.prune import kept_indices, make_model, node_weight, prune, run, tensor, weight, with_initializers
from tests.passes.prune.test_coupling import assert_close, conv

STEM, BRANCH = 8, 12  # stem channels (conv g=1), branch channels (conv g=2, blocks of 6)
MIX_GROUPS = 4  # the mixing conv reads concat(branch, stem) = 20 channels in blocks of 5


def _model():
    rng = np.random.default_rng(50)
    inits = {"ws": weight(rng, STEM, 3, 3, 3), "bs": weight(rng, STEM),
             "wb": weight(rng, BRANCH, STEM // 2, 1, 1), "bb": weight(rng, BRANCH),
             "wm": weight(rng, 8, (STEM + BRANCH) // MIX_GROUPS, 1, 1)}
    n = helper.make_node
    nodes = [
        conv("stem", "x", "ws", "s", bias="bs"), n("Relu", ["s"], ["rs"], name="relu_s"),
        conv("branch", "rs", "wb", "b", group=2, bias="bb", pads=0), n("Relu", ["b"], ["rb"], name="relu_b"),
        n("Concat", ["rb", "rs"], ["c"], name="concat", axis=1),
        conv("mix", "c", "wm", "y", group=MIX_GROUPS, pads=0),
    ]
    model = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 8, 6, 6])], inits)
    return model, inits


def _balanced(mask: np.ndarray, size: int, blocks: int, offset: int = 0) -> np.ndarray:
    """Per subset (bit i = channel i pruned): whether each block of ``size // blocks`` channels of the space
    holding bits offset .. offset + size loses as many."""
    bits = (mask[:, None] >> (offset + np.arange(size))) & 1
    per = bits.reshape(len(mask), blocks, size // blocks).sum(axis=2)
    return (per == per[:, :1]).all(axis=1)


def _best_balanced(stem_cap: int, branch_cap: int) -> int:
    """The most channels a balanced choice prunes, each side at most its cap: every subset enumerated."""
    total = STEM + BRANCH
    best = 0
    for start in range(0, 1 << total, 1 << 16):  # bits 0..11: branch channels, 12..19: stem channels
        mask = np.arange(start, start + (1 << 16), dtype=np.int64)
        ok = _balanced(mask, BRANCH, 2) & _balanced(mask, STEM, 2, offset=BRANCH)
        ok &= _balanced(mask, total, MIX_GROUPS)  # the concat is (branch, stem): the bit order matches
        bits = (mask[:, None] >> np.arange(total)) & 1
        branch, stem = bits[:, :BRANCH].sum(axis=1), bits[:, BRANCH:].sum(axis=1)
        ok &= (branch <= branch_cap) & (stem <= stem_cap)
        if ok.any():
            best = max(best, int((branch + stem)[ok].max()))
    return best


def test_misaligned_grouped_convs_prune_the_most_a_balanced_choice_allows():
    model, inits = _model()
    pruned, report = prune(model, "channels=0.5,round-to=1,protect=none")
    ks = kept_indices(inits["bs"], node_weight(pruned, "stem", 2), 0)
    kb = kept_indices(inits["bb"], node_weight(pruned, "branch", 2), 0)
    gone = (STEM - len(ks)) + (BRANCH - len(kb))
    assert gone == _best_balanced(STEM // 2, BRANCH // 2) > 0
    # the balance itself, read from the pruned model: every group of every grouped conv keeps as many
    assert len({int((ks // (STEM // 2) == g).sum()) for g in range(2)}) == 1
    assert len({int((kb // (BRANCH // 2) == g).sum()) for g in range(2)}) == 1
    concat = np.concatenate([kb, BRANCH + ks])
    block = (STEM + BRANCH) // MIX_GROUPS
    assert len({int((concat // block == g).sum()) for g in range(MIX_GROUPS)}) == 1

    # what is kept computes what it did: the original with the pruned channels zeroed at their source
    ws, bs, wb, bb = (inits[k].copy() for k in ("ws", "bs", "wb", "bb"))
    drop_s, drop_b = np.setdiff1d(np.arange(STEM), ks), np.setdiff1d(np.arange(BRANCH), kb)
    ws[drop_s], bs[drop_s], wb[drop_b], bb[drop_b] = 0, 0, 0, 0
    reference = with_initializers(model, {"ws": ws, "bs": bs, "wb": wb, "bb": bb})
    feeds = {"x": np.random.default_rng(51).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    assert_close(run(pruned, feeds)["y"], run(reference, feeds)["y"])
