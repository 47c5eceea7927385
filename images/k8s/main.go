// Command kubernetes is kindling's multi-call Kubernetes binary, in the spirit
// of the old hyperkube: one statically linked executable holding
// kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
// and kubectl. It dispatches on the basename of argv[0], so the guest image
// installs it once as /usr/local/bin/kubernetes plus one symlink per component
// (/usr/local/bin/kubelet -> kubernetes, ...). `kubernetes COMPONENT ARGS...`
// works too.
//
// Linking the six components together shares the ~80% of the code they have in
// common, which roughly halves compile+link time and disk use compared with six
// separate binaries. Each component's main() upstream is reproduced below with
// the same side-effect imports, and the command object is only constructed for
// the component that is actually run.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	_ "time/tzdata" // CronJob time zone support (kube-apiserver, kube-controller-manager)

	"github.com/spf13/cobra"

	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl auth plugins (oidc)
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric registration
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// components maps a component name to a function that builds its root command
// and runs it, returning the process exit code.
var components = map[string]func() int{
	"kube-apiserver":          func() int { return cli.Run(apiserver.NewAPIServerCommand()) },
	"kube-controller-manager": func() int { return cli.Run(controllermanager.NewControllerManagerCommand()) },
	"kube-scheduler":          func() int { return run(scheduler.NewSchedulerCommand()) },
	"kubelet":                 func() int { return cli.Run(kubelet.NewKubeletCommand()) },
	"kube-proxy":              func() int { return cli.Run(proxy.NewProxyCommand()) },
	"kubectl": func() int {
		// Same as upstream cmd/kubectl: kubectl prints its own errors.
		if err := cli.RunNoErrOutput(kubectlcmd.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
		return 0
	},
}

// run is cli.Run; kube-scheduler's constructor is variadic (out-of-tree plugin
// registry options), which is why it needs this small adapter.
func run(cmd *cobra.Command) int { return cli.Run(cmd) }

func names() []string {
	var n []string
	for k := range components {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

func main() {
	name := filepath.Base(os.Args[0])
	if _, ok := components[name]; !ok && len(os.Args) > 1 {
		// `kubernetes COMPONENT ARGS...`: make the component see itself as argv[0].
		if _, ok := components[os.Args[1]]; ok {
			name = os.Args[1]
			os.Args = os.Args[1:]
		}
	}
	runComponent, ok := components[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "usage: %s COMPONENT [ARGS...], or run it through a symlink named after the component\ncomponents: %s\n",
			filepath.Base(os.Args[0]), strings.Join(names(), ", "))
		os.Exit(2)
	}
	os.Exit(runComponent())
}
