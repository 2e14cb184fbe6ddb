"""Host facilities: the command runner, cgroups, mount namespaces, process capture."""
