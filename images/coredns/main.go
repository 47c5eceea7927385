// Command coredns is upstream CoreDNS (coremain) linked with only the plugins
// the default Kubernetes Corefile (kubeadm's) uses, instead of upstream's
// core/plugin which pulls in every plugin and the AWS, Azure, GCP, etcd, dnstap,
// geoip ... SDKs. This cuts the build to a fraction and the binary to about half.
//
// The default Corefile:
//
//	.:53 {
//	    errors
//	    health { lameduck 5s }
//	    ready
//	    kubernetes cluster.local in-addr.arpa ip6.arpa {
//	       pods insecure
//	       fallthrough in-addr.arpa ip6.arpa
//	       ttl 30
//	    }
//	    prometheus :9153
//	    forward . /etc/resolv.conf { max_concurrent 1000 }
//	    cache 30
//	    loop
//	    reload
//	    loadbalance
//	}
//
// plus log (commonly switched on for debugging) and whoami (tiny, no
// dependencies, and what CoreDNS's built-in configuration uses when it is started
// without a Corefile). forward and kubernetes link in debug, dnstap, metadata
// and transfer themselves, so those are usable directives too.
package main

import (
	"github.com/coredns/caddy"
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics" // the "prometheus" directive
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/whoami"
)

func init() {
	// Keep upstream's execution order (dnsserver.Directives, generated from
	// plugin.cfg; the order matters) restricted to the plugins linked into this
	// binary. This init runs after every imported package's, so all plugins have
	// registered by now. A Corefile naming any other plugin fails to load with
	// "unknown directive".
	linked := map[string]bool{}
	for _, p := range caddy.ListPlugins()["others"] {
		linked[p] = true
	}
	var directives []string
	for _, d := range dnsserver.Directives {
		if linked["dns."+d] {
			directives = append(directives, d)
		}
	}
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
