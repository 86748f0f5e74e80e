module hboneinterop

go 1.19
