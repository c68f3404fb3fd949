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

// The LAST BACKUP column gives the last backup's age and size, and a
// failure since.
func TestWriteStatusLastBackup(t *testing.T) {
	at := time.Now().Add(-90 * time.Second)
	for _, tt := range []struct {
		name string
		b    *apitype.BackupStatus
		want string
	}{
		{"no target", nil, "64MiB  -  "},
		{"never", &apitype.BackupStatus{Schedule: "24h"}, "never"},
		{"one", &apitype.BackupStatus{Last: &apitype.Backup{Time: at, Size: 3 << 20}}, "1m30s ago (3.0MiB)"},
		{"failing", &apitype.BackupStatus{Last: &apitype.Backup{Time: at, Size: 3 << 20}, LastError: "unreachable: dial tcp"}, "1m30s ago (3.0MiB), failing: unreachable"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			in := apitype.Instance{ID: "i1", State: apitype.StateRunning, Port: 16000, MemoryMB: 64, Backup: tt.b}
			if err := WriteStatus(&b, []apitype.Instance{in}); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(b.String(), tt.want) {
				t.Fatalf("status table:\n%s\nwant it to hold %q", b.String(), tt.want)
			}
		})
	}
}
