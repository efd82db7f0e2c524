"""The training platform (`guardtune platform`): submit, queue, watch and promote `train` jobs.

A service of its own, beside serving: jobs are heavy. It sits above training (whose schema and
memory estimator it uses) and talks to serving only over HTTP (the admin API), so serving never
depends on it.

- model.py: a job and its states; store.py: where jobs live (SQLite, or PostgreSQL shared by instances);
- submit.py: a request body -> a validated job; admission.py: whether its estimated memory fits now;
- executors/: where jobs run (local subprocesses; Kubernetes Jobs or PyTorchJobs);
- runner.py: the process a local job runs in; progress.py: curves, tokens/s and ETA from its metrics;
- queue.py: the loop that admits, watches and recovers jobs; promote.py: the eval gate and the swap;
- replay.py: the gate's replay of a task's recent guarded traffic with the candidate;
- loop.py: a task's recent bad cases (serving's audit store) -> a DPO job;
- api.py and app.py: the HTTP API and the page (page/index.html); cli.py: `guardtune platform`.
"""
