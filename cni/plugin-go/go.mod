module ambient-mesh/cni/plugin-go

go 1.19
