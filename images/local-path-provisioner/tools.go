//go:build tools

// This module only pins github.com/rancher/local-path-provisioner (a main package,
// built by build.sh with `go build github.com/rancher/local-path-provisioner`); the
// blank import keeps it and its dependencies in go.mod and go.sum (`go mod tidy`).
package tools

import _ "github.com/rancher/local-path-provisioner"
