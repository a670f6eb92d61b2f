"""Offline jobs: the queue on the SQL store, job kinds, the runner, embedded workers and Ray."""
