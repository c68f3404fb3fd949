package test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// try sends a request and returns the status and body, or the transport
// error (the agent may be dying).
func (a *agentProc) try(method, path, body string) (int, []byte, error) {
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, a.base+path, r)
	if err != nil {
		return 0, nil, err
	}
	switch {
	case method == "PUT" && strings.HasSuffix(path, "/snapshot"):
		req.Header.Set("Content-Type", "application/octet-stream") // an RDB
	case body != "":
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// redisProcs returns pid -> config path of every live redis-server whose
// config lies under root.
func redisProcs(root string) map[int]string {
	out := map[int]string{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !alive(pid) {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		title := string(bytes.TrimRight(bytes.ReplaceAll(b, []byte{0}, []byte{' '}), " "))
		i := strings.LastIndexByte(title, ' ')
		if i >= 0 && strings.HasPrefix(title[i+1:], root) {
			out[pid] = title[i+1:]
		}
	}
	return out
}

// checkInvariants verifies that the machine is exactly what the agent's
// state says: every instance is running on its own port with its own
// directory and a live process running its config; no port is held twice;
// no directory or redis-server under the data root lacks a record; nothing
// is reported as an orphan; and every binding in creds answers PING with
// its credentials. It returns the instances.
func checkInvariants(t *testing.T, a *agentProc, creds map[string]credentials) []instance {
	t.Helper()
	var list struct{ Instances []instance }
	deadline := time.Now().Add(20 * time.Second)
	for {
		list.Instances = nil
		a.do("GET", "/v1/instances", "", &list)
		settled := true
		for _, in := range list.Instances {
			if in.State != "running" {
				settled = false
			}
		}
		if settled {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("instances not all running after 20s: %+v", list.Instances)
		}
		time.Sleep(10 * time.Millisecond)
	}
	root := filepath.Join(a.dataDir, "instances")
	ports := map[int]string{}
	ids := map[string]bool{}
	pids := map[int]string{}
	for _, in := range list.Instances {
		ids[in.ID] = true
		if other, dup := ports[in.Port]; dup {
			t.Errorf("port %d held by %s and %s", in.Port, other, in.ID)
		}
		ports[in.Port] = in.ID
		pids[in.PID] = in.ID
		if st, err := os.Stat(filepath.Join(root, in.ID, "data")); err != nil || !st.IsDir() {
			t.Errorf("%s has no data directory: %v", in.ID, err)
		}
	}
	procs := redisProcs(root + "/")
	for pid, conf := range procs {
		id := filepath.Base(filepath.Dir(conf))
		if pids[pid] != id {
			t.Errorf("redis-server pid %d runs %s but the record of %q says pid %v", pid, conf, id, pidOf(list.Instances, id))
		}
	}
	for pid, id := range pids {
		if _, ok := procs[pid]; !ok {
			t.Errorf("%s: recorded pid %d is not a live redis-server of ours", id, pid)
		}
	}
	entries, _ := os.ReadDir(root)
	var dirs []string
	for _, e := range entries {
		if e.Name() == "_uploads" {
			// Restores' bodies while they are received: none is under
			// way when the checker runs.
			if left, _ := os.ReadDir(filepath.Join(root, e.Name())); len(left) != 0 {
				t.Errorf("upload files left behind: %v", left)
			}
			continue
		}
		dirs = append(dirs, e.Name())
		if !ids[e.Name()] {
			t.Errorf("directory %s has no record", e.Name())
		}
	}
	sort.Strings(dirs)
	var orphans struct{ Orphans []json.RawMessage }
	a.do("GET", "/v1/orphans", "", &orphans)
	if len(orphans.Orphans) != 0 {
		t.Errorf("orphans reported: %s", orphans.Orphans)
	}
	for key, c := range creds {
		id := strings.SplitN(key, "/", 2)[0]
		if !ids[id] {
			continue
		}
		if err := redisClient(t, c).Ping(context.Background()).Err(); err != nil {
			t.Errorf("binding %s cannot PING: %v", key, err)
		}
	}
	return list.Instances
}

func pidOf(list []instance, id string) any {
	for _, in := range list {
		if in.ID == id {
			return in.PID
		}
	}
	return "(no record)"
}

// teeReader copies what is read from r into w.
func teeReader(r io.Reader, w io.Writer) io.Reader { return io.TeeReader(r, w) }
