"""Data, tensor and pipeline parallelism in real processes (one short file per idea, as picotron).

    comm.py               ProcessGroup: send/recv, ring all-reduce, reduce-scatter, all-gather, broadcast
    grid.py               the dp x tp x pp rank grid and each track's group (Megatron's layout)
    launch.py             spawn N workers, heartbeats, failures -> GroupFailure
    schedule.py           pipeline schedules (GPipe, 1F1B, interleaved 1F1B) as data; bubble and memory
                          on a logical clock
    trace.py              timed events per rank -> JSON and a Gantt chart
    tensor_parallel.py    Megatron's column/row split of a Llama block, vocab-parallel embedding and loss
    pipeline_parallel.py  the stage model and the executor that runs a schedule
    data_parallel.py      bucketed gradient all-reduce (DDP's order) and ZeRO-1
    engine.py             one training step on the whole grid; the worker of `llama3np parallel train`
    supervisor.py         restart from the last checkpoint on a dead, hung or NaN worker; fault injection
    mpi.py                the same ProcessGroup over mpi4py (run under mpiexec)
    cli.py                `llama3np parallel train --dp D --tp T --pp P ...`
    examples.py           small worker functions for the notebooks and the benchmark

Equivalence is the point: every grid trains to the weights of one process (tests/test_parallel_train.py).
"""
