#!/usr/bin/env bash
# The security group of cluster.yaml's nodes: SSH (22) from the operator's CIDR and all traffic
# between the cluster's own nodes; nothing else. The dashboard (8265), the GCS (6379) and the Ray
# client server (10001) stay closed to the outside and are reached through SSH
# (`ray dashboard cluster.yaml`). Ray's own default group would open SSH to 0.0.0.0/0, which is why
# cluster.yaml names this one in every node type's SecurityGroupIds.
#
#   scripts/aws_security_group.sh OPERATOR_CIDR [VPC_ID]   # creates the group, prints its id
#   scripts/aws_security_group.sh --print-rules OPERATOR_CIDR [GROUP_ID]   # the rules only, as JSON
#
# OPERATOR_CIDR: where you run `ray up` from, e.g. 203.0.113.7/32 (your public IP: curl
# https://checkip.amazonaws.com). VPC_ID: default: the region's default VPC (the subnets Ray picks
# when node_config has no SubnetIds). Region: AWS_REGION / the AWS CLI's configuration; it must be
# cluster.yaml's. Needs the AWS CLI and ec2:CreateSecurityGroup, ec2:AuthorizeSecurityGroupIngress,
# ec2:DescribeVpcs.
set -euo pipefail

GROUP_NAME="${DETR_RAY_SECURITY_GROUP:-detr-ray}"

usage() {
    echo "usage: $0 OPERATOR_CIDR [VPC_ID]" >&2
    echo "       $0 --print-rules OPERATOR_CIDR [GROUP_ID]" >&2
    exit 2
}

check_cidr() {   # an IPv4 CIDR, and not the whole internet
    local cidr="$1"
    if ! [[ "$cidr" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$ ]]; then
        echo "error: '$cidr' is not an IPv4 CIDR such as 203.0.113.7/32" >&2
        exit 2
    fi
    if [[ "${cidr#*/}" == 0 ]]; then
        echo "error: $cidr opens SSH to the whole internet; give your own address or network" >&2
        exit 2
    fi
}

# The ingress rules, in the form of `aws ec2 authorize-security-group-ingress --ip-permissions`.
rules_json() {   # rules_json CIDR GROUP_ID
    cat <<EOF
[
  {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
   "IpRanges": [{"CidrIp": "$1", "Description": "SSH from the operator"}]},
  {"IpProtocol": "-1",
   "UserIdGroupPairs": [{"GroupId": "$2", "Description": "all traffic between the cluster's nodes"}]}
]
EOF
}

if [[ "${1:-}" == "--print-rules" ]]; then
    [[ $# -ge 2 ]] || usage
    check_cidr "$2"
    rules_json "$2" "${3:-GROUP_ID}"
    exit 0
fi

[[ $# -ge 1 && "$1" != -* ]] || usage
CIDR="$1"
check_cidr "$CIDR"
VPC_ID="${2:-}"
if [[ -z "$VPC_ID" ]]; then
    VPC_ID="$(aws ec2 describe-vpcs --filters Name=is-default,Values=true --query 'Vpcs[0].VpcId' --output text)"
    [[ "$VPC_ID" == vpc-* ]] || { echo "error: no default VPC; give VPC_ID (and SubnetIds in cluster.yaml)" >&2; exit 1; }
fi
GROUP_ID="$(aws ec2 create-security-group --group-name "$GROUP_NAME" --vpc-id "$VPC_ID" \
    --description "detr-ray cluster: SSH from the operator, all traffic between nodes" \
    --query GroupId --output text)"
aws ec2 authorize-security-group-ingress --group-id "$GROUP_ID" \
    --ip-permissions "$(rules_json "$CIDR" "$GROUP_ID")" > /dev/null
echo "$GROUP_ID"
echo "created $GROUP_NAME in $VPC_ID; put it in cluster.yaml: SecurityGroupIds: [$GROUP_ID]" >&2
