"""The daemon's garbage-collector settings (daemon.tune_gc), in a process of their own: freezing objects here
would keep the whole test session's garbage alive. What they buy is measured in bench/, not here."""
import json
import subprocess
import sys

PROBE = """
import gc, json, weakref
from dr_bridge.daemon import GC_MIDDLE_THRESHOLD, GC_YOUNG_THRESHOLD, tune_gc
class Node: pass
before = gc.get_threshold()
frozen = tune_gc()
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after start-up, then dropped: it must still be collected
gone = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen,
                  "freeze_count": gc.get_freeze_count(), "young": GC_YOUNG_THRESHOLD, "middle": GC_MIDDLE_THRESHOLD,
                  "later_cycle_collected": gone() is None}))
"""


def test_start_up_objects_are_frozen_and_the_younger_generations_are_collected_less_often():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60)
    r = json.loads(out.stdout)
    assert r["frozen"] == r["freeze_count"] > 10_000  # the imported modules and what they made
    assert r["after"] == [r["young"], r["middle"], r["before"][2]]  # the oldest generation's stays
    assert r["young"] > r["before"][0] and r["middle"] > r["before"][1]
    assert r["later_cycle_collected"]
