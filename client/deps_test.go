package client

import (
	"os/exec"
	"strings"
	"testing"
)

// A consumer of the API (a broker) must not pull in the agent: the client
// depends on the standard library and the wire types only.
func TestClientDependsOnWireTypesOnly(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	allowed := map[string]bool{
		"github.com/redis-agent/redis-agent/apitype": true,
		"github.com/redis-agent/redis-agent/client":  true,
	}
	for _, pkg := range strings.Fields(string(out)) {
		first, _, _ := strings.Cut(pkg, "/")
		if !strings.Contains(first, ".") || strings.HasPrefix(pkg, "vendor/") || allowed[pkg] {
			continue // the standard library, or ours and allowed
		}
		t.Errorf("client depends on %s (bbolt, cgroups, go-redis and the agent must stay out)", pkg)
	}
}
