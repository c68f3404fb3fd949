package client

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
)

// The status table's LAST EXIT column gives the reason, with the message
// when there is one (why a spawn failed).
func TestWriteStatusLastExit(t *testing.T) {
	at := time.Now().Add(-time.Minute)
	for _, tt := range []struct {
		name string
		exit *apitype.Exit
		want string
	}{
		{"none", nil, "  -\n"},
		{"a crash", &apitype.Exit{Time: at, Code: 1, Reason: apitype.ReasonCrash}, "crash (code 1) 1m0s ago"},
		{"a kill", &apitype.Exit{Time: at, Code: -1, Signal: "killed", Reason: apitype.ReasonOOM}, "oom (killed) 1m0s ago"},
		{"a spawn failure", &apitype.Exit{Time: at, Code: -1, Reason: apitype.ReasonSpawnFailed, Message: "fork/exec /x: no such file or directory"},
			"spawn_failed: fork/exec /x: no such file or directory (code -1) 1m0s ago"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			in := apitype.Instance{ID: "i1", State: apitype.StateBackoff, Port: 16000, MemoryMB: 64, LastExit: tt.exit}
			if err := WriteStatus(&b, []apitype.Instance{in}); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(b.String(), tt.want) {
				t.Fatalf("status table:\n%s\nwant it to hold %q", b.String(), tt.want)
			}
		})
	}
}

// The EVICTION and TLS columns: the policy, and the TLS mode with its port.
func TestWriteStatusSettings(t *testing.T) {
	var b bytes.Buffer
	insts := []apitype.Instance{
		{ID: "plain", State: apitype.StateRunning, Port: 16000, MemoryMB: 64, MaxmemoryPolicy: "noeviction", TLS: "off"},
		{ID: "secure", State: apitype.StateRunning, Port: 16001, MemoryMB: 64, MaxmemoryPolicy: "allkeys-lru", TLS: "required", TLSPort: 16002},
	}
	if err := WriteStatus(&b, insts); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if f := strings.Fields(lines[0]); f[7] != "EVICTION" || f[8] != "TLS" {
		t.Fatalf("header %q", lines[0])
	}
	if f := strings.Fields(lines[1]); f[7] != "noeviction" || f[8] != "-" {
		t.Fatalf("plain line %q", lines[1])
	}
	if f := strings.Fields(lines[2]); f[7] != "allkeys-lru" || f[8] != "required:16002" {
		t.Fatalf("TLS line %q", lines[2])
	}
}
