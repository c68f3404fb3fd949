//go:build faultinject

package agent

import (
	"os"
	"syscall"
)

// crashAt kills the agent, as a power cut or OOM kill would, when
// REDIS_AGENT_CRASH_AT names point.
func crashAt(point string) {
	if os.Getenv("REDIS_AGENT_CRASH_AT") == point {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL is not instant
	}
}
