"""Proof that the cluster keeps its promises: histories, checkers, nemesis and the torture runner.

history.py   operations (invoke, complete, ok/fail/unknown) and their JSON-lines form
models.py    sequential specifications (register, counter) for the linearizability search
linearizable.py  per-key Wing–Gong/Porcupine search with a cache and a time limit
shrink.py    the smallest failing sub-history of a non-linearizable key
checkers.py  lost acknowledged writes, superseded values that return, sibling bounds, convergence
raft.py      one leader per term, no committed entry lost (over node observations)
report.py    every checker over one history: text / JSON report;  plot.py  the timeline PNG
nemesis.py   the seeded fault schedule;  workload.py  client workers that record the history
cluster.py   ClusterUnderTest (the interface a real or simulated cluster plugs into)
inprocess.py the in-process reference cluster (and its deliberate bugs) the runner is tested on
runner.py    one torture run: cluster, workers, nemesis, heal, final states, checkers, report
"""
