//go:build tools

// This module only pins sigs.k8s.io/metrics-server (its main package is built by
// build.sh with `go build sigs.k8s.io/metrics-server/cmd/metrics-server`); the blank
// import keeps it and its dependencies in go.mod and go.sum (`go mod tidy`).
package tools

import _ "sigs.k8s.io/metrics-server/cmd/metrics-server"
