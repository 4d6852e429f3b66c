"""The coordinator: a fault-tolerant pipeline of Ray jobs (pre-train -> fine-tune per task -> evaluate ->
results table) whose state lives in one JSON document on storage. `python -m kitdist.coordinator --help`.

    spec.py      PIPELINE.yaml's schema        plan.py      the checked jobs of a pipeline
    state.py     the state document            pipeline.py  the loop that drives it
    jobs.py      Ray's job API                  cluster.py   RAY_ADDRESS or a local cluster, auth
    report.py    results table, status          demo.py      the demo pipeline's data
"""
