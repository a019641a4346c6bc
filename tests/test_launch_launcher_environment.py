"""Ranks started by srun or mpirun find their rank, world and master from the launcher's variables."""

from neox_fork.launch.launcher import first_slurm_host, mpi_environment, slurm_environment


def test_slurm_variables_map_to_torch_ones_without_overriding_set_ones():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[003-004,9]"}
    assert slurm_environment(env) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu003",
                                      "MASTER_PORT": "29500"}
    assert "MASTER_ADDR" not in slurm_environment({**env, "MASTER_ADDR": "head"})
    assert slurm_environment({}) == {}
    assert first_slurm_host("a[1-2]b[7,9],c1") == "a1b7"


def test_open_mpi_variables_map_to_torch_ones():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}
    assert mpi_environment(env) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    assert mpi_environment({**env, "RANK": "0"}) == {"LOCAL_RANK": "1", "WORLD_SIZE": "4"}
