package test

import (
	"os"
	"os/exec"
	"testing"
)

// promtool returns the path of promtool (Debian's prometheus package).
// Without it the test is skipped on a developer's machine and fails under
// CI (CI=true), where the alert tests must run.
func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("promtool not installed (apt-get install prometheus); CI must run the alert rule tests")
		}
		t.Skip("promtool not installed (apt-get install prometheus)")
	}
	return p
}

// The alert rules are valid, and their promtool unit tests
// (deploy/prometheus-rules.test.yml) pass.
func TestRulesPromtool(t *testing.T) {
	bin := promtool(t)
	for _, args := range [][]string{
		{"check", "rules", "../deploy/prometheus-rules.yml"},
		{"test", "rules", "../deploy/prometheus-rules.test.yml"},
	} {
		out, err := exec.CommandContext(t.Context(), bin, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %v: %v\n%s", args, err, out)
		}
	}
}
