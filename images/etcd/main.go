// Command etcd is kindling's etcd server and etcdctl (v3 API) in one static
// binary. It dispatches on the basename of argv[0]: installed as
// /usr/local/bin/etcd with /usr/local/bin/etcdctl -> etcd. `etcd ctl ARGS...`
// runs etcdctl too.
package main

import (
	"os"
	"path/filepath"

	"go.etcd.io/etcd/etcdctl/v3/ctlv3"
	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	name := filepath.Base(os.Args[0])
	if name != "etcdctl" && len(os.Args) > 1 && (os.Args[1] == "ctl" || os.Args[1] == "etcdctl") {
		os.Args = os.Args[1:]
		name = "etcdctl"
	}
	if name == "etcdctl" {
		// Same as upstream etcdctl's main for the v3 API (the only one built in).
		os.Unsetenv("ETCDCTL_API")
		ctlv3.MustStart()
		return
	}
	etcdmain.Main(os.Args)
}
